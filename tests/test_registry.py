"""``memext.registry.Registry``: duplicates refused, names listed, did-you-mean for unknown names,
building by signature (a config pool takes only what a variant names; explicit settings a variant
does not take are refused), defaults read from signatures, checks run without building."""

from __future__ import annotations

import pytest

from memext.registry import Registry, SettingError, check_int


def _registry() -> Registry:
    reg: Registry = Registry("widget")

    @reg.register("round")
    class Round:
        built = 0

        def __init__(self, radius: int = 3, colour: str = "red") -> None:
            self.check(radius)
            type(self).built += 1
            self.radius, self.colour = radius, colour

        @classmethod
        def check(cls, radius: int) -> None:
            check_int(cls.name, "radius", radius, 1)

    @reg.register("square")
    class Square:
        def __init__(self, side: int, colour: str = "red") -> None:
            self.side, self.colour = side, colour

    return reg


def test_a_name_registers_once_and_a_refused_one_changes_nothing() -> None:
    reg = _registry()
    before = dict(reg)
    with pytest.raises(ValueError, match="widget 'round' is registered twice"):
        reg.register("round")(type("Other", (), {}))
    assert dict(reg) == before and reg["round"].name == "round"


def test_names_are_listed_and_unknown_ones_get_a_did_you_mean() -> None:
    reg = _registry()
    assert reg.names() == ["round", "square"] and list(reg) == ["round", "square"]
    with pytest.raises(
        ValueError,
        match=r"unknown widget 'sqare': expected one of round, square "
        r"\(did you mean 'square'\?\)",
    ):
        reg.build("sqare", side=2)
    with pytest.raises(
        ValueError, match=r"unknown widget 'hexagon': expected one of round, square$"
    ):
        reg.lookup("hexagon")


def test_unknown_settings_given_on_purpose_are_refused() -> None:
    reg = _registry()
    with pytest.raises(
        ValueError,
        match=r"widget 'round' takes no setting radus \(did you mean 'radius' for 'radus'\?\); "
        r"it takes: radius, colour",
    ):
        reg.build("round", radus=4)
    with pytest.raises(ValueError, match="widget 'square' needs setting side"):
        reg.build("square")


def test_a_config_pool_gives_each_variant_the_settings_it_names() -> None:
    reg = _registry()
    pool = {"radius": 5, "side": 2, "colour": "blue", "unrelated": object()}
    round_, square = reg.build("round", pool), reg.build("square", pool)
    assert (round_.radius, round_.colour, square.side, square.colour) == (5, "blue", 2, "blue")
    assert reg.build("round", pool, radius=7).radius == 7  # explicit settings override the pool


def test_defaults_come_from_the_signatures_and_must_agree() -> None:
    reg = _registry()
    assert reg.default("colour") == "red" and reg.default("radius") == 3
    assert reg.users("colour") == ["round", "square"] and reg.takes("square") == ("side", "colour")
    with pytest.raises(ValueError, match="no widget declares a default for 'side'"):
        reg.default("side")

    @reg.register("triangle")
    class Triangle:
        def __init__(self, colour: str = "green") -> None:
            self.colour = colour

    with pytest.raises(ValueError, match="widget variants disagree on the default of colour"):
        reg.default("colour")


def test_check_runs_the_variants_own_check_without_building_it() -> None:
    reg = _registry()
    cls = reg["round"]
    reg.check("round", {"radius": 2})
    reg.check("square", {"side": -1})  # no check of its own: anything goes
    with pytest.raises(SettingError, match=r"round: radius=0 is invalid: expected an integer > 0"):
        reg.check("round", {"radius": 0})
    with pytest.raises(SettingError) as info:
        reg.build("round", radius=True)  # a bool is not a count
    assert (info.value.variant, info.value.setting, info.value.value) == ("round", "radius", True)
    assert cls.built == 0


def test_every_family_is_a_registry_and_nothing_is_called_tasks_twice() -> None:
    import importlib
    import pkgutil

    import memext
    from memext.data.tasks import TASKS
    from memext.variants import registries

    assert all(isinstance(r, Registry) and len(r) for r in registries())
    assert len({r.kind for r in registries()}) == len(registries())
    from memext.evals.suite_tasks import SUITE_TASKS

    named_tasks, task_registries = set(), {}
    for info in pkgutil.walk_packages(memext.__path__, "memext."):
        if not info.name.endswith("__main__"):
            module = importlib.import_module(info.name)
            named_tasks.add(id(getattr(module, "TASKS", TASKS)))
            for name, value in vars(module).items():
                if name.endswith("TASKS") and isinstance(value, Registry):
                    task_registries.setdefault(name, set()).add(id(value))
    assert named_tasks == {id(TASKS)}  # every module's TASKS is the one generator registry
    # One vocabulary: generators (data/) in TASKS, suite tasks (evals/) in SUITE_TASKS, no other.
    assert task_registries == {"TASKS": {id(TASKS)}, "SUITE_TASKS": {id(SUITE_TASKS)}}


def test_memext_info_lists_every_registry_by_name() -> None:
    from typer.testing import CliRunner

    from memext.cli import app
    from memext.variants import registries

    result = CliRunner().invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for registry in registries():
        assert f"{registry.kind}: {', '.join(registry.names())}" in lines
    assert "attention: block_sparse, chunked, full, lsh, sliding" in lines
