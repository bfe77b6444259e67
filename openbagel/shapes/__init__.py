"""The Shapes world (spec: shared/specs/shapes-world.md): scenes, renderer, texts, tasks, detector, scorer."""

from .detect import detect
from .render import render
from .scene import Obj, Scene, load_scene, save_scene
from .tasks import Task, make_task

__all__ = ["Obj", "Scene", "Task", "detect", "load_scene", "make_task", "render", "save_scene"]
