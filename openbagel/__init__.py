"""openbagel: an open, clean-room BAGEL."""
