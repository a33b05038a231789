"""The README against the command line it documents, and the report's figures.

test_docs.py checks that the Markdown renders (fences, anchors, files); these check what it
says: every ``igkd COMMAND ... --option`` written in it is an option of that command, every
option of every command is named somewhere in it, so a renamed or removed option, or one
added without a word, fails here rather than in a user's pasted command.
"""

import argparse
import json
import re
from pathlib import Path

from igkd.cli import make_parser

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
OPTION = re.compile(r"(?<![\w-])--[A-Za-z][A-Za-z0-9-]*")


def command_options() -> dict[tuple[str, ...], tuple[set[str], list[tuple[str, ...]]]]:
    """(every option string, the option strings of each option --help shows) of each command
    that runs (``bench latency``, not ``bench``), by its words."""
    found = {}

    def walk(parser, path):
        every, shown = set(), []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, (*path, name))
                return  # a command of subcommands ('igkd experiment'): its options are theirs
            every.update(action.option_strings)
            if action.option_strings and action.help != argparse.SUPPRESS and action.dest != "help":
                shown.append(tuple(action.option_strings))
        found[path] = (every, shown)

    walk(make_parser(), ())
    return found


def readme_commands(text: str) -> list[str]:
    """Every ``igkd ...`` command line written in the README: inline code spans and the lines
    of code blocks (continuation backslashes joined), each cut at a comment or a shell operator."""
    text = re.sub(r"\\\n\s*", " ", text)
    found = re.findall(r"`(igkd [^`]+)`", text)
    in_block = False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            in_block = not in_block
        elif in_block:
            found += [m.group(1) for m in re.finditer(r"(?:^|[;&|(]\s*|\s)(igkd [^#;|&]*)", line)]
    return found


def wrong_options(text: str, commands) -> list[str]:
    """'igkd CMD: --opt' for every option written after a command that the command lacks."""
    wrong = []
    for line in map(" ".join, map(str.split, readme_commands(text))):
        path = ()
        for word in line.split()[1:]:
            if not any(p[:len(path) + 1] == (*path, word) for p in commands):
                break
            path = (*path, word)
        if path not in commands:  # 'igkd experiment {ablation,...}', 'igkd experiment $e': no one command
            continue
        wrong += [f"igkd {' '.join(path)}: {o}  (in `{line[:80]}`)"
                  for o in OPTION.findall(line) if o not in commands[path][0]]
    return wrong


def test_the_option_check_finds_a_wrong_option():
    commands = command_options()
    assert ('experiment',) not in commands and ('experiment', 'search') in commands
    text = ("Run `igkd distill --method kd --no-such-option 1`, then\n\n```bash\n"
            "igkd report runs/x \\\n   --format svg --epochs 3   # --epochs is distill's\n```\n")
    assert wrong_options(text, commands) == [
        "igkd distill: --no-such-option  (in `igkd distill --method kd --no-such-option 1`)",
        "igkd report: --epochs  (in `igkd report runs/x --format svg --epochs 3`)"]


def test_every_option_the_readme_gives_a_command_is_one_of_its_options():
    wrong = wrong_options(README, command_options())
    assert not wrong, "README commands with options their command does not have:\n" + "\n".join(wrong)


def test_every_option_of_every_command_is_named_in_the_readme():
    named = set(OPTION.findall(README))
    missing = {}
    for path, (_, shown) in command_options().items():
        # an on/off option is named by either of its spellings (--latency, --no-latency)
        gaps = sorted(strings[0] for strings in shown if not named.intersection(strings))
        if gaps:
            missing[" ".join(path) or "igkd"] = gaps
    assert not missing, f"options no README line names: {missing}"


def _tick_labels(svg: Path) -> list[str]:
    # matplotlib writes each text of an SVG figure as paths after a comment holding the text
    return re.findall(r"<!-- (.*?) -->", svg.read_text())


def test_one_epoch_curves_have_the_epoch_as_their_only_tick(tmp_path):
    from igkd.report import write_report
    (tmp_path / "summary.json").write_text(json.dumps({"method": "kd+ig", "epochs": 1}))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_accuracy": 50.0, "loss": 1.5}) + "\n")
    write_report(tmp_path, sections=[("curves", "igkd.report:curves_section")], formats="png,svg")
    texts = _tick_labels(tmp_path / "curves.svg")
    # the x ticks are the texts before each 'epoch' axis label
    ticks = []
    for i, t in enumerate(texts):
        if t == "epoch":
            j = i
            while j > 0 and re.fullmatch(r"[\d.\u2212-]+", texts[j - 1]):
                j -= 1
            ticks.append(texts[j:i])
    assert ticks == [["1"], ["1"]], ticks  # was 0.945, 0.960, ... 1.050: no epoch shown at all


def test_curves_without_validation_say_so_instead_of_an_empty_panel(tmp_path):
    from igkd.report import write_report
    (tmp_path / "summary.json").write_text(json.dumps({"method": "student", "epochs": 2}))
    (tmp_path / "metrics.jsonl").write_text("".join(  # --val-fraction 0: no validation accuracy
        json.dumps({"epoch": e, "val_accuracy": None, "loss": 2.0 - e / 10}) + "\n" for e in (1, 2)))
    write_report(tmp_path, sections=[("curves", "igkd.report:curves_section")], formats="png,svg")
    texts = _tick_labels(tmp_path / "curves.svg")
    assert any("no validation split" in t for t in texts), texts
    # the empty panel had epoch ticks round zero (-0.045 ... 0.045) and accuracy ticks -0.04 ... 0.04
    assert not [t for t in texts if re.fullmatch(r"[\u2212-]?0\.\d+", t)], texts


def main_options_rows(text: str) -> list[tuple[list[str], list[str]]]:
    """(option names, default texts) of the rows of the README's "Main options" table whose
    defaults pair one to one with their options."""
    table = text.split("Main options", 1)[1].split("\n\n", 2)[1]
    rows = []
    for line in table.splitlines()[2:]:
        names_cell, defaults_cell = line.split(" | ")[:2]
        names = re.findall(r"`--([\w-]+)`", names_cell)
        defaults = [d.strip(" `") for d in re.sub(r"\([^)]*\)", "", defaults_cell).split(",")]
        if len(names) == len(defaults):
            rows.append((names, defaults))
    return rows


def test_the_main_options_table_gives_the_defaults_of_distill():
    from dataclasses import fields

    from igkd.config import DistillConfig
    defaults = {f.name: f.default for f in fields(DistillConfig)}
    checked, wrong = 0, []
    for names, texts in main_options_rows(README):
        for name, text in zip(names, texts):
            key = name.replace("-", "_")
            if key not in defaults:  # --quiet, --json: no option of the work
                continue
            value = defaults[key]
            checked += 1
            if isinstance(value, bool):
                ok = text == ("on" if value else "off")
            elif isinstance(value, (int, float)):
                ok = float(text) == value
            else:
                ok = text == value
            if not ok:
                wrong.append(f"--{name}: README {text!r}, distill {value!r}")
    assert checked >= 20 and not wrong, (checked, wrong)


def test_the_readme_lists_every_shipped_recipe():
    from igkd.config import shipped_configs
    listed = README.split("`igkd config list` lists them (", 1)[1].split(")", 1)[0]
    assert sorted(re.findall(r"`(\w+)`", listed)) == sorted(shipped_configs()), listed
    # and every recipe a command names (placeholders are upper case: --config YAML, NAME)
    named = set(re.findall(r"(?:--config|config show) ([a-z][\w]*)", README))
    assert named and named <= set(shipped_configs()), named - set(shipped_configs())


def test_the_commands_table_has_a_row_per_command():
    table = README.split("| command | what it does |", 1)[1].split("\n\n", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `igkd ")]
    missing = [" ".join(path) for path in command_options()
               if not any(re.match(rf"\| `igkd {re.escape(' '.join(path))}[ `]", row) for row in rows)]
    assert len(rows) >= 15 and not missing, missing


def test_the_report_of_an_experiment_on_a_relative_folder_renders_from_elsewhere(tmp_path, monkeypatch):
    """An experiment on imagefolder:imgs (relative, as the shipped recipes' data/cifar10-jpg)
    keeps that spec; 'igkd report' run from another folder failed as a whole, naming a dataset
    folder, because the teacher-maps illustration could not load the images."""
    import igkd
    from igkd.config import PrecomputeConfig
    from igkd.report import write_report

    from conftest import TINY_TEACHER
    from helpers_data import write_image_folder
    ran_in, exp = tmp_path / "project", tmp_path / "project" / "exp"
    write_image_folder(ran_in / "imgs", per_class=3, side=8)
    exp.mkdir()
    monkeypatch.chdir(ran_in)
    store = igkd.precompute(igkd.build_model(TINY_TEACHER, 2, 3).eval(), "imagefolder:imgs",
                            PrecomputeConfig(ig_steps=2, check_images=0), quiet=True, threads=1)
    (exp / "ablation.json").write_text(json.dumps({  # the fields of an experiment's record the section reads
        "store": str(store.path), "data": "imagefolder:imgs", "maps": {"description": "IG x 2 steps"}}))
    gallery = [("gallery", "igkd.report:gallery_section")]
    monkeypatch.chdir(tmp_path)
    text = write_report(exp, sections=gallery)
    assert "cannot be read from here" in text and "imagefolder:imgs" in text and not (exp / "gallery.png").exists()
    monkeypatch.chdir(ran_in)  # where the experiment ran, the maps are drawn
    assert "![gallery](gallery.png)" in write_report(exp, sections=gallery) and (exp / "gallery.png").exists()


def test_a_report_of_the_current_folder_is_titled_with_its_name(tmp_path, monkeypatch):
    from igkd.report import write_report
    run = tmp_path / "my-run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"method": "kd+ig", "model": "mobilenetv2:drop=5", "params": 1,
                                                   "best_epoch": 1, "val_accuracy": 50.0, "test_accuracy": 50.0,
                                                   "dataset": "demo", "epochs": 1}))
    monkeypatch.chdir(run)  # igkd report .
    assert write_report(".", sections=[("run", "igkd.report:run_section")]).startswith("# igkd report: my-run\n")
