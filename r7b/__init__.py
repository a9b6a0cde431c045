"""r7b-edge: Cohere's Command R7B on hardware people already own."""

__version__ = "0.1.0"
