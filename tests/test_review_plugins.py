"""A researcher's method part and attribution from outside igkd: what only worked for
igkd's own parts, and the README's Python API as written."""

import subprocess
import sys

import pytest

import igkd
from igkd import config
from igkd.distill import parts as registry
from igkd.distill.parts import Part
from igkd.errors import UserError
from igkd.options import opt
from helpers_cli import installed_plugin


class Named(Part):
    """A part whose one option is named like one of igkd's own."""

    def __init__(self, option):
        self.name = f"plug-{option}"
        self.help = "a plug-in part"
        self.fields = {option: opt(0.5, f"plug-{option}: its own {option}", low=0.0, high=10.0)}


@pytest.mark.parametrize("option", ["lr", "method", "smoothgrad_samples"])
def test_a_parts_option_named_like_an_igkd_option_is_refused_naming_the_part(option):
    """DistillConfig was one dataclass of igkd's fields and the parts': a part's `lr` replaced
    the recipe's, so its default 0.5 became every run's learning rate, silently (a part's
    `method` replaced the method itself)."""
    part = Named(option)
    registry._parts[part.name] = part  # as an entry point adds it, before the configs are built
    try:
        with pytest.raises(UserError, match=rf"method part 'plug-{option}' declares option '{option}', which "):
            config._distill_config()
    finally:
        del registry._parts[part.name]
    assert config._distill_config()().lr != 0.5  # without it, the configs build as before


def test_the_readmes_experiments_api_works_after_import_igkd():
    """The README's `igkd.experiments.resolve(...)` after `import igkd` was an AttributeError
    (the lazy package bound a submodule only once something imported it)."""
    got = type(igkd).__getattr__(igkd, "experiments")  # what `igkd.experiments` falls back to when unbound
    assert got is sys.modules["igkd.experiments"] and callable(got.resolve)
    with pytest.raises(AttributeError, match="has no attribute 'nosuch'"):
        igkd.nosuch


PLUG = '''
from igkd.distill.parts import Part
from igkd.options import opt


class Repeat(Part):
    name = "repeat"
    help = "a part with an option named like an experiment's"
    fields = {"runs": opt(3, "repeat: how often", low=1, high=10)}


PART = Repeat()
'''


def test_a_plugin_option_named_like_an_experiments_is_one_line(tmp_path):
    """ExperimentConfig extends DistillConfig: its `runs` silently replaced the part's, so
    `--runs` set the Monte Carlo count and the part never saw its option."""
    env = installed_plugin(tmp_path, "repeat_part", PLUG, "[igkd.parts]\nrepeat = repeat_part:PART\n")
    r = subprocess.run([sys.executable, "-m", "igkd", "experiment", "montecarlo", "--help"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stdout == "", r.stdout[-500:]
    assert r.stderr == ("igkd: error: method part 'repeat' declares option 'runs', which ExperimentConfig already "
                        "has; name the option after its part or attribution (e.g. repeat_runs)\n")


class Searched(Part):
    name = "plug-search"
    help = "a plug-in part with its own search lists"
    fields = {"plug_mode": opt("mean", "plug-search: reduction", choices=("mean", "max"))}


@pytest.mark.parametrize("lists", [{"plug_mode": ["mean", "max"]}, {"plug_weight": [0.1, 1]}])
def test_a_parts_search_list_of_words_or_of_an_option_it_lacks_is_one_line(lists):
    """`igkd experiment search --search-method` read a plug-in part's `search` lists as floats
    (ValueError on a choice option's words) and looked their names up unchecked (KeyError)."""
    from igkd.experiments.config import resolve
    from igkd.experiments.search import search_space
    part = Searched()
    part.search = lists
    registry._parts[part.name] = part
    try:
        cfg = resolve("search", None, {"search_method": "kd+plug-search"})
        with pytest.raises(UserError, match=rf"method part 'plug-search' lists search values .* for '{next(iter(lists))}'"
                                            r", which is not one of its numeric options \(none\)"):
            search_space(cfg)
    finally:
        del registry._parts[part.name]
