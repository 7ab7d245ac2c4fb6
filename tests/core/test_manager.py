import textwrap

import pytest

from plait.core.errors import PluginError
from plait.core.hookspecs import API_VERSION
from plait.core.manager import Plugins, list_plugins

RECORDING_PLUGIN = """
from plait.core.hookspecs import hookimpl
CALLS = []

@hookimpl
def plait_fit_start(state):
    state.append(("start", "{name}"))

@hookimpl
def plait_fit_end(state):
    state.append(("end", "{name}"))

@hookimpl
def plait_build_head(config, in_dim, num_classes):
    return "{name}"
"""


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))

    def make(module: str, source: str) -> str:
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
        return module

    return make


def test_start_hooks_in_yaml_order_end_hooks_reversed(plugin_dir):
    names = [plugin_dir(f"rec_{n}", RECORDING_PLUGIN.replace("{name}", n)) for n in ("a", "b", "c")]
    plugins = Plugins().load(names)
    calls: list = []
    plugins.call_each("plait_fit_start", state=calls)
    plugins.call_each("plait_fit_end", state=calls)
    assert calls == [("start", "a"), ("start", "b"), ("start", "c"), ("end", "c"), ("end", "b"), ("end", "a")]
    # first-result hooks: the first plugin in YAML order wins
    assert plugins.first("plait_build_head", config=None, in_dim=1, num_classes=2) == "a"


def test_chain_passes_each_result_on(plugin_dir):
    for n in ("x", "y"):
        plugin_dir(f"chain_{n}", f"""
            from plait.core.hookspecs import hookimpl
            @hookimpl
            def plait_configure_model(model, config):
                return model + ["{n}"]
        """)
    plugin_dir("chain_none", """
        from plait.core.hookspecs import hookimpl
        @hookimpl
        def plait_configure_model(model, config):
            model.append("in-place")
    """)
    plugins = Plugins().load(["chain_x", "chain_none", "chain_y"])
    assert plugins.chain("plait_configure_model", "model", model=[], config=None) == ["x", "in-place", "y"]


def test_unknown_builtin_name_suggests_nearest():
    with pytest.raises(PluginError, match="unknown plugin 'fusoin'.*did you mean 'fusion'"):
        Plugins().load(["fusoin"])


def test_plugin_that_fails_to_import_is_named(plugin_dir):
    plugin_dir("broken_plugin", "import not_a_module_anywhere\n")
    with pytest.raises(PluginError, match="plugin 'broken_plugin' failed to import: ModuleNotFoundError"):
        Plugins().load(["broken_plugin"])


def test_broken_plugin_does_not_break_the_others(plugin_dir):
    plugin_dir("broken_plugin2", "raise RuntimeError('boom')\n")
    plugins = Plugins().load(["fusion", "augment"])  # a run that does not ask for it works
    assert plugins.order == ["fusion", "augment"]
    infos = {i.name: i for i in list_plugins(extra=["broken_plugin2"])}
    assert infos["broken_plugin2"].status == "failed" and "boom" in infos["broken_plugin2"].error
    assert infos["fusion"].status == "loaded" and infos["fusion"].source == "built-in"


def test_unknown_hook_suggests_nearest(plugin_dir):
    plugin_dir("typo_plugin", """
        from plait.core.hookspecs import hookimpl
        @hookimpl
        def plait_fit_strat(state):
            pass
    """)
    with pytest.raises(PluginError, match="unknown hook 'plait_fit_strat'.*did you mean 'plait_fit_start'"):
        Plugins().load(["typo_plugin"])


def test_deny_and_allow_lists(plugin_dir, monkeypatch):
    plugin_dir("third_party", "X = 1\n")
    monkeypatch.setenv("PLAIT_PLUGINS_DENY", "curves")
    with pytest.raises(PluginError, match="PLAIT_PLUGINS_DENY"):
        Plugins().load(["curves"])
    monkeypatch.delenv("PLAIT_PLUGINS_DENY")
    monkeypatch.setenv("PLAIT_PLUGINS_ALLOW", "")
    with pytest.raises(PluginError, match="PLAIT_PLUGINS_ALLOW"):
        Plugins().load(["third_party"])
    assert Plugins().load(["curves"]).order == ["curves"]  # built-ins stay allowed
    monkeypatch.setenv("PLAIT_PLUGINS_ALLOW", "third_party")
    assert Plugins().load(["third_party"]).order == ["third_party"]


def test_exception_in_a_hook_names_plugin_and_hook(plugin_dir):
    plugin_dir("raising_plugin", """
        from plait.core.hookspecs import hookimpl
        @hookimpl
        def plait_epoch_start(state):
            raise ValueError("bad epoch")
    """)
    plugins = Plugins().load(["raising_plugin"])
    with pytest.raises(ValueError) as err:
        plugins.call_each("plait_epoch_start", state=None)
    assert "in plugin 'raising_plugin', hook 'plait_epoch_start'" in err.value.__notes__


def test_builtins_are_entry_points():
    infos = {i.name: i for i in list_plugins()}
    for name in ("spoken_digits", "manifest", "text_encoder", "image_encoder", "audio_encoder", "fusion"):
        assert infos[name].source == "built-in" and infos[name].distribution == "plait"


def test_plugin_commands_join_the_cli_and_a_broken_one_is_skipped(plugin_dir, monkeypatch, capsys):
    from importlib.metadata import EntryPoint

    from plait.core import manager
    from plait.launch.cli import main

    plugin_dir("hello_plugin", """
        from plait.core.hookspecs import hookimpl
        @hookimpl
        def plait_register_commands(subparsers):
            hello = subparsers.add_parser("hello")
            hello.set_defaults(func=lambda args: print("hello from a plugin") or 0)
    """)
    plugin_dir("bad_commands", """
        from plait.core.hookspecs import hookimpl
        @hookimpl
        def plait_register_commands(subparsers):
            raise RuntimeError("no commands today")
    """)
    real = manager.discover()
    extra = {n: EntryPoint(name=n, value=n, group="plait") for n in ("hello_plugin", "bad_commands")}
    monkeypatch.setattr(manager, "discover", lambda: {**real, **extra})
    assert main(["hello"]) == 0
    captured = capsys.readouterr()
    assert "hello from a plugin" in captured.out
    assert "plugin 'bad_commands' could not add its commands: no commands today" in captured.err


@pytest.mark.parametrize("module, declared, expected", [
    ("future_plugin", ">=2,<3", ("plugin 'future_plugin' supports the plait plugin API >=2,<3, but this plait has API "
                     f"{API_VERSION}")),
    ("garbled_plugin", "one point oh", "plugin 'garbled_plugin': PLAIT_API 'one point oh' is not a version range"),
])
def test_a_plugin_for_another_api_version_is_refused_by_name(plugin_dir, module, declared, expected):
    plugin_dir(module, f"""
        PLAIT_API = "{declared}"
        from plait.core.hookspecs import hookimpl
        @hookimpl
        def plait_fit_start(state):
            pass
    """)
    with pytest.raises(PluginError, match=expected):
        Plugins().load([module])
    status = {i.name: i for i in list_plugins([module])}[module]
    assert status.status == "failed" and "API" in status.error


def test_a_plugin_within_the_api_range_loads(plugin_dir):
    plugin_dir("current_plugin", """
        PLAIT_API = ">=1.1,<2"
        from plait.core.hookspecs import hookimpl
        @hookimpl
        def plait_fit_start(state):
            pass
    """)
    assert Plugins().load(["current_plugin"]).order == ["current_plugin"]


def test_plugins_order_prints_the_order_hooks_run_in(plugin_dir, tmp_path, capsys):
    import json

    from plait.launch.cli import main

    names = [plugin_dir(f"ord_{n}", RECORDING_PLUGIN.replace("{name}", n)) for n in ("a", "b")]
    config = tmp_path / "order.yaml"
    config.write_text("plugins:\n  ord_b: {}\n  ord_a: {}\n")  # YAML order, not alphabetical
    assert main(["plugins", "--order", str(config), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["plait_fit_start"] == ["ord_b", "ord_a"] and printed["plait_fit_end"] == ["ord_a", "ord_b"]
    plugins = Plugins().load(["ord_b", "ord_a"])  # and that is the order they are called in
    calls: list = []
    plugins.call_each("plait_fit_start", state=calls)
    plugins.call_each("plait_fit_end", state=calls)
    assert [who for _, who in calls] == [n[-1] for n in printed["plait_fit_start"] + printed["plait_fit_end"]]
    assert set(names) == set(printed["plait_build_head"])


def test_docs_hooks_md_is_the_hook_reference(capsys):
    from pathlib import Path

    from plait.launch.cli import main
    from plait.launch.hookdoc import hook_names

    assert main(["hooks"]) == 0
    printed = capsys.readouterr().out
    docs = Path(__file__).parents[2] / "docs" / "hooks.md"
    assert docs.read_text() == printed, "docs/hooks.md is stale: run `plait hooks > docs/hooks.md`"
    assert all(f"### `{name}(" in printed for name in hook_names())
    assert len(hook_names()) >= 20 and "plait_build_model" in hook_names()


@pytest.mark.parametrize("marker", ["wrapper=True", "hookwrapper=True"])
def test_a_pluggy_wrapper_is_refused_at_load_naming_the_plugin(plugin_dir, marker):
    plugin_dir("wrapping_plugin", f"""
        from plait.core.hookspecs import hookimpl
        @hookimpl({marker})
        def plait_fit_start(state):
            yield
    """)
    with pytest.raises(PluginError, match="plugin 'wrapping_plugin': 'plait_fit_start' is a pluggy wrapper"):
        Plugins().load(["wrapping_plugin"])
    listed = {i.name: i for i in list_plugins(["wrapping_plugin"])}["wrapping_plugin"]
    assert listed.status == "failed" and "pluggy wrapper" in listed.error  # `plait plugins` says so too


def test_a_registered_object_wraps_the_loaded_plugins_and_tryfirst_goes_first(plugin_dir):
    from plait.core import hookspecs
    from plait.core.hookspecs import hookimpl

    names = [plugin_dir(f"wrap_{n}", RECORDING_PLUGIN.replace("{name}", n)) for n in ("a", "b")]
    plugin_dir("eager", """
        from plait.core.hookspecs import hookimpl
        @hookimpl(tryfirst=True)
        def plait_fit_end(state):
            state.append(("end", "eager"))
    """)
    plugins = Plugins().load([*names, "eager"])

    class Runner:
        @hookimpl
        def plait_fit_start(self, state):
            state.append(("start", "runner"))

        @hookimpl
        def plait_fit_end(self, state):
            state.append(("end", "runner"))

    plugins.register(Runner(), name="runner")
    calls: list = []
    plugins.call_each(hookspecs.plait_fit_start, state=calls)  # the hookspec itself, as the loop calls it
    plugins.call_each(hookspecs.plait_fit_end, state=calls)
    assert calls == [("start", "runner"), ("start", "a"), ("start", "b"),
                     ("end", "eager"), ("end", "b"), ("end", "a"), ("end", "runner")]
    assert plugins.implementers(hookspecs.plait_fit_end) == ["eager", "wrap_b", "wrap_a", "runner"]
    assert plugins.order[0] == "runner" and plugins.infos["runner"].source == "runner"
