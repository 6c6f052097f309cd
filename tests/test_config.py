"""The config tree and its loading: numbers in scientific notation, overrides that must name a
field, scalars where a section belongs, ranges, duplicate keys and rules across fields."""

import json
import pickle
import re

import pytest
from pydantic import BaseModel

from ead_dist.config import ConfigError, RunConfig, load_config, parse_config


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


# --- the typed tree: ranges, zeros, duplicates, rules across fields ---------------------------

@pytest.mark.parametrize("text", ["0", "-5"])
def test_iterations_must_be_positive_in_the_file_and_in_overrides(tmp_path, text):
    path = _write(tmp_path, f"distill: {{iterations: {text}}}\n")
    with pytest.raises(ConfigError, match=f"distill.iterations must be positive, got {text}"):
        load_config(path)
    with pytest.raises(ConfigError, match=f"distill.iterations must be positive, got {text}"):
        load_config(_write(tmp_path, "name: x\n"), [f"distill.iterations={text}"])


@pytest.mark.parametrize("field", ["realgrad.real_samples", "experts.train_samples",
                                   "evaluate.test_samples", "ray.num_cpus", "distill.threads",
                                   "distill.student_batch_size"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_no_zero_or_negative_count_stands_for_all(tmp_path, field, value):
    # null says "all of them"; a zero would silently mean the same through `x or default`.
    with pytest.raises(ConfigError, match=f"{field} must be positive, got {value}"):
        load_config(_write(tmp_path, "name: x\n"), [f"{field}={value}"])
    assert load_config(_write(tmp_path, "name: x\n"), [f"{field}=null"]) is not None


def test_seeds_must_not_be_negative(tmp_path):
    with pytest.raises(ConfigError, match="realgrad.seed must be >= 0, got -1"):
        load_config(_write(tmp_path, "realgrad: {seed: -1}\n"))


@pytest.mark.parametrize("text, field", [
    ("distill: {ipc: 10, ipc: 1}\n", "distill.ipc"),
    ("distill: {ipc: 10}\nexperts: {lr: 0.1}\ndistill: {iterations: 3}\n", "distill"),
    ("evaluate:\n  models: [convnet]\n  runs: 2\n  models: [mlp]\n", "evaluate.models"),
])
def test_a_key_given_twice_is_refused_naming_file_field_and_lines(tmp_path, text, field):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value).startswith(f"{path}: {field} is given twice (lines ")


def test_a_key_given_twice_in_an_override_value_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="--set distill={ipc: 1, ipc: 2}.*ipc is given twice"):
        load_config(_write(tmp_path, "name: x\n"), ["distill={ipc: 1, ipc: 2}"])


def test_every_mistake_is_reported_at_once(tmp_path):
    path = _write(tmp_path, "distill: {ipc: 0, objective: nope}\nexperts: {lr: fast}\n"
                            "model: {widht: 64}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    for part in ("distill.ipc must be positive", "distill.objective must be one of",
                 "experts.lr must be float", "unknown field model.widht"):
        assert part in message, part
    assert message.startswith(path) and "\n" not in message


def test_true_is_not_a_number_and_three_is_not_a_string(tmp_path):
    with pytest.raises(ConfigError, match="distill.ipc must be int, got True"):
        load_config(_write(tmp_path, "distill: {ipc: true}\n"))
    with pytest.raises(ConfigError, match="name must be str, got 3"):
        load_config(_write(tmp_path, "name: 3\n"))


@pytest.mark.parametrize("override, message", [
    ("evaluate.models=[]", "evaluate.models must not be empty"),
    ("evaluate.models=[convnet, mlp, convnet]", "evaluate.models names convnet more than once"),
    ("evaluate.baselines=[init, init]", "evaluate.baselines names init more than once"),
    ("evaluate.models=[vit]", "evaluate.models[0] must be one of 'convnet'"),
    ("model.name=vit", "model.name must be one of 'convnet'"),
])
def test_model_names_and_baselines(tmp_path, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(_write(tmp_path, "name: x\n"), [override])


@pytest.mark.parametrize("overrides, message", [
    (["distill.objective=trajectory", "weights.method=kde"],
     "weights.method 'kde' weights the real terms, which distill.objective 'trajectory'"),
    (["distill.method=herding", "weights.method=kde"],
     "weights.method 'kde' is used by distill.method ead, dm and dc only"),
    (["distill.objective=matching", "distill.coefficient=paper"],
     "distill.coefficient 'paper' weights the scalar objective only"),
    (["realgrad.class_terms=false", "distill.objective=per_class_effect"],
     "needs per-class real terms"),
])
def test_rules_across_fields(tmp_path, overrides, message):
    path = _write(tmp_path, "name: x\n")
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        load_config(path, overrides)
    assert str(error.value).startswith(path)
    # Each rule refuses only the combination: either half alone loads.
    for override in overrides:
        load_config(path, [override] + (["distill.objective=scalar"]
                                        if override == "distill.coefficient=paper" else []))


@pytest.mark.parametrize("section", [name for name, field in RunConfig.model_fields.items()
                                     if isinstance(field.annotation, type)
                                     and issubclass(field.annotation, BaseModel)])
def test_every_section_refuses_unknown_keys_in_files_and_overrides(tmp_path, section):
    # A section added later is covered by being a field of RunConfig.
    path = _write(tmp_path, f"{section}: {{no_such_field: 1}}\n")
    with pytest.raises(ConfigError, match=rf"{path}: unknown field {section}\.no_such_field "):
        load_config(path)
    with pytest.raises(ConfigError, match=rf"unknown field {section}\.no_such_field in --set"):
        load_config(_write(tmp_path, "name: x\n"), [f"{section}.no_such_field=1"])


def test_the_resolved_config_round_trips_through_json_and_pickle(tmp_path):
    config = load_config(_write(tmp_path, "distill: {ipc: 3, lr_images: 1e-3}\n"),
                         ["evaluate.models=[convnet, mlp]", "realgrad.real_samples=null"])
    again = parse_config(json.loads(config.to_json()), "again")
    assert again == config and again.to_json() == config.to_json()
    assert pickle.loads(pickle.dumps(config)) == config  # Ray ships configs to workers


def test_a_missing_or_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "none.yaml"))
    with pytest.raises(ConfigError, match="not a YAML text file"):
        load_config(str(tmp_path))


def test_evaluate_lr_learned_needs_the_trajectory_objective(tmp_path):
    path = _write(tmp_path, "name: x\n")
    learned = load_config(path, ["distill.objective=trajectory", "evaluate.lr=learned"])
    assert learned.evaluate.lr == "learned"
    assert load_config(path, ["evaluate.lr=3e-2"]).evaluate.lr == 0.03
    with pytest.raises(ConfigError, match=re.escape(
            "evaluate.lr 'learned' is the student step size the trajectory objective learns, "
            "and distill.method 'ead' with distill.objective 'matching' learns none")):
        load_config(path, ["evaluate.lr=learned"])
    with pytest.raises(ConfigError, match="image-text evaluation trains with Adam"):
        load_config(path, ["data.dataset=cc3m", "distill.objective=trajectory",
                           "evaluate.lr=learned"])
    with pytest.raises(ConfigError, match="evaluate.lr"):
        load_config(path, ["evaluate.lr=fast"])
