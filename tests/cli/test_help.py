"""An option that sets a pass's config field is documented once, in the config: --help reads it."""

from __future__ import annotations

from typer.main import get_command
from typer.testing import CliRunner

from onnxcompress.cli import app
from onnxcompress.cli.common import resolve_pass_help
from onnxcompress.pass_base import get_pass


def test_every_option_help_naming_a_pass_field_resolves():
    group = get_command(app)
    commands = group.commands.values()  # type: ignore[attr-defined]
    helps = [param.help or "" for command in commands for param in command.params]
    resolved = [
        resolve_pass_help(text) for text in helps
    ]  # a renamed field would raise KeyError here
    assert not any("{pass:" in text for text in resolved)
    assert sum(text != before for text, before in zip(resolved, helps, strict=True)) >= 20


def test_help_shows_the_config_description_and_default():
    result = CliRunner().invoke(app, ["sparsify", "--help"], env={"COLUMNS": "400", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    field = get_pass("sparse.csr").Config.model_fields["min_sparsity"]
    assert f"{field.description} [default: {field.default}]" in result.output
    assert (
        "Gate: lowest cosine of each output, logits for softmax outputs [default: 0.99]."
        in result.output
    )
