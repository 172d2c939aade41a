"""tsalign: TS-Align (teacher-student iterative alignment) as one Hydra-configured CLI."""

__version__ = "0.1.0"
