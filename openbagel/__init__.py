"""openbagel: an open, clean-room BAGEL — understand, generate, edit, think, in plain PyTorch."""

from .config import BagelConfig, LLMConfig, ViTConfig, VAEConfig, preset

__version__ = "0.1.0"
__all__ = ["BagelConfig", "BagelPipeline", "EditSession", "LLMConfig", "Request", "ViTConfig", "VAEConfig", "preset",
           "__version__"]


def __getattr__(name: str):
    # The pipeline pulls in transformers; import it only when asked for.
    if name in ("BagelPipeline", "Request"):
        from .inference import pipeline

        return getattr(pipeline, name)
    if name == "EditSession":
        from .inference.session import EditSession

        return EditSession
    raise AttributeError(name)
