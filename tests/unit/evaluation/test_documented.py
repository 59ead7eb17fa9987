from dataclasses import dataclass, field

from evaluation.documented import documented
from evaluation.judge import JudgeConfig
from evaluation.runner import EvalSettings


def test_the_docstring_lists_each_field_with_its_type_and_help():
    @documented
    @dataclass
    class Settings:
        """What to run."""

        steps: int = field(default=3, metadata={"help": "How many steps."})
        name: str | None = field(default=None, metadata={"help": "Who runs them."})

    assert Settings.__doc__ == (
        "What to run.\n\nAttributes\n----------\nsteps : int\n    How many steps.\nname : str | None\n"
        "    Who runs them.\n"
    )


def test_the_settings_classes_document_every_field():
    for cls in (EvalSettings, JudgeConfig):
        doc = " ".join(cls.__doc__.split())
        for name, f in cls.__dataclass_fields__.items():
            assert f"{name} : {f.type} {f.metadata['help']}" in doc, name
