"""The one way dcube gets matplotlib: the headless Agg backend, and text drawn literally.

Class names and file names come from the data; with mathtext on, a label such as ``$5 copay`` made
matplotlib raise after all the training. ``text.parse_math = False`` draws every string as written.
"""

from __future__ import annotations


def literal_text() -> None:
    import matplotlib

    matplotlib.rcParams["text.parse_math"] = False


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, with literal text."""
    import matplotlib

    matplotlib.use("Agg")
    literal_text()
    import matplotlib.pyplot as plt

    return plt
