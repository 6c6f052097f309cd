"""The config tree's loading: numbers in scientific notation, overrides that must name a field,
scalars where a section belongs."""

import pytest

from ead_dist.config import ConfigError, load_config


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_scientific_notation_in_yaml_gives_floats(tmp_path):
    # PyYAML reads 1e-3 and 5e-5 as strings (its float pattern needs a dot).
    config = load_config(_write(tmp_path, "distill: {lr_images: 1e-3, lr_student_lr: 5e-5}\n"))
    assert config.distill.lr_images == 0.001
    assert config.distill.lr_student_lr == 5e-05
    assert isinstance(config.distill.lr_images, float)


def test_scientific_notation_in_overrides(tmp_path):
    config = load_config(_write(tmp_path, "name: x\n"),
                         ["distill.lr_labels=2E-2", "experts.lr=+1e-1", "distill.student_lr=1e-4"])
    assert (config.distill.lr_labels, config.experts.lr) == (0.02, 0.1)
    assert config.distill.student_lr == 1e-4  # Optional[float]


def test_negative_lr_from_scientific_notation_still_meets_validation(tmp_path):
    with pytest.raises(ConfigError, match="experts.lr must be positive"):
        load_config(_write(tmp_path, "experts: {lr: -1e-2}\n"))


@pytest.mark.parametrize("text, expected", [("1e3", 1000), ("2.5e2", 250), ("1.0e+3", 1000),
                                            ("40.0", 40)])
def test_int_fields_take_numbers_that_are_exact_integers(tmp_path, text, expected):
    config = load_config(_write(tmp_path, f"distill: {{iterations: {text}}}\n"))
    assert config.distill.iterations == expected
    assert isinstance(config.distill.iterations, int)


@pytest.mark.parametrize("text", ["1.5e0", "2.5", "1e-1", "nan", ".inf", "ten"])
def test_int_fields_refuse_numbers_that_are_not_integers(tmp_path, text):
    path = _write(tmp_path, f"distill: {{iterations: {text}}}\n")
    with pytest.raises(ConfigError, match="distill.iterations must be int") as error:
        load_config(path)
    assert path in str(error.value)


@pytest.mark.parametrize("text", ["1e-3x", "e3", "1e", "inf", "true"])
def test_float_fields_refuse_what_is_not_a_decimal_number(tmp_path, text):
    with pytest.raises(ConfigError, match="distill.lr_images must be float"):
        load_config(_write(tmp_path, "name: x\n"), [f"distill.lr_images={text}"])


def test_strings_stay_strings(tmp_path):
    config = load_config(_write(tmp_path, "name: 1e3\n"))
    assert config.name == "1e3"


@pytest.mark.parametrize("override, field", [
    ("distill.ipc.x=3", "distill.ipc"),  # a value used as a section
    ("nosuchsection.x=1", "nosuchsection"),
    ("distill.nosuchfield=1", "distill.nosuchfield"),
    ("evaluate.models.first=mlp", "evaluate.models"),
], ids=["value-as-section", "unknown-section", "unknown-field", "list-as-section"])
def test_override_path_must_name_a_field(tmp_path, override, field):
    path = _write(tmp_path, "distill: {ipc: 10}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path, [override])
    assert field in str(error.value) and path in str(error.value)


def test_value_as_section_is_refused_when_the_file_does_not_set_it(tmp_path):
    with pytest.raises(ConfigError, match="distill.ipc is a value, not a section"):
        load_config(_write(tmp_path, "name: x\n"), ["distill.ipc.x=3"])


@pytest.mark.parametrize("text", ["distill: 3\n", "distill: [1, 2]\n", "distill: fast\n"])
def test_a_scalar_where_a_section_belongs_is_refused(tmp_path, text):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match="distill must be a mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match="distill must be a mapping"):
        load_config(path, ["distill.ipc=3"])  # the override walks into it


def test_a_section_set_to_a_scalar_by_override_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="distill must be a mapping"):
        load_config(_write(tmp_path, "name: x\n"), ["distill=3"])


def test_top_level_scalar_is_refused_before_overrides(tmp_path):
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(_write(tmp_path, "just a string\n"), ["distill.ipc=3"])


def test_override_with_invalid_yaml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "name: x\n"), ["evaluate.models=[convnet"])


def test_valid_override_still_applies(tmp_path):
    config = load_config(_write(tmp_path, "distill: {ipc: 10}\n"),
                         ["distill.ipc=3", "evaluate.models=[convnet, mlp]"])
    assert config.distill.ipc == 3 and config.evaluate.models == ["convnet", "mlp"]


def test_a_class_wise_objective_without_class_terms_is_refused(tmp_path):
    path = _write(tmp_path, "realgrad: {class_terms: false}\n")
    load_config(path, ["distill.objective=matching"])
    with pytest.raises(ConfigError, match="class_terms"):
        load_config(path, ["distill.objective=class_matching"])


@pytest.mark.parametrize("override", ["realgrad.chunk=0", "realgrad.dtype=bfloat16"])
def test_realgrad_memory_settings_are_checked(tmp_path, override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(_write(tmp_path, "name: x\n"), [override])
