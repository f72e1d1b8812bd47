"""The three images of the README's `vlmkit chat` examples, drawn as a user would draw their own:
vlmkit's renderers with values picked by hand and a seed of this script's own (so they are not
any image of the quickstart's data; `tests/train/test_quickstart_reading.py` checks that).

    .venv/bin/python docs/examples/make_images.py
"""

from __future__ import annotations

import random
from pathlib import Path

from vlmkit.data.synthetic.render import bar_chart, scene, word_image

HERE = Path(__file__).resolve().parent
# What each image shows, and what the chat examples ask about it.
EXAMPLES = {
    "chart.png": ("What is the value of bar B? Answer with a number.", "6"),
    "word.png": ("What word is written in the image? Answer with the word.", "tiger"),
    "shapes.png": ("What colour are the shapes? Answer with one word.", "orange"),
}


def main() -> None:
    rng = random.Random("vlmkit docs examples")
    bar_chart(rng, ["A", "B", "C"], [3, 6, 8]).save(HERE / "chart.png")
    word_image(rng, "tiger").save(HERE / "word.png")
    scene(rng, 3, "orange", "triangle").save(HERE / "shapes.png")


if __name__ == "__main__":
    main()
