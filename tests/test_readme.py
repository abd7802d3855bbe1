"""The README's measured figures are the ones recorded in results/, so a re-run that changes them shows here."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_demo_figures_are_the_recorded_demo_output():
    recorded = (ROOT / "results" / "demo.txt").read_text()
    printed = dict(re.findall(r"^(\S+): perplexity ([\d.]+) ", recorded, re.MULTILINE))
    minutes = re.search(r"^finished: .*, (\d+) min wall$", recorded, re.MULTILINE)[1]
    quoted = re.search(r"`results/demo\.txt`[^`]*?: FP ([\d.]+), QQQ-g64 ([\d.]+), (\d+) min wall",
                       (ROOT / "README.md").read_text())
    assert quoted, "the README no longer quotes results/demo.txt"
    assert quoted.groups() == (printed["FP"], printed["qqq"], minutes)
