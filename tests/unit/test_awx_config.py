"""AWX as code (awx/): surveys, credential type, schedules and the approved failover workflow.

The surveys are checked against the argument specs of the roles their job
template's playbook runs, so that a survey can never offer a value the role
refuses, and leaving every answer at its default changes nothing.
"""

from __future__ import annotations

import configparser
import datetime
import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT

AWX = os.path.join(ROOT, "awx")
VENV_BIN = os.path.dirname(sys.executable)
PLAYBOOK_CMD = os.path.join(VENV_BIN, "ansible-playbook")
UTC = datetime.timezone.utc

SURVEY_TYPES = {"text", "textarea", "password", "integer", "float", "multiplechoice", "multiselect"}
# Answers Ansible's boolean() reads as false and true; a survey offers exactly these two.
BOOL_CHOICES = {"false", "true"}


def read_yaml(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def read_json(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as fh:
        return json.load(fh)


SETTINGS = read_yaml("awx", "settings", "controller.yml")
TEMPLATES = {t["name"]: t for t in SETTINGS["awx_job_templates"]}
SCHEDULES = {s["job_template"]: s for s in SETTINGS["awx_schedules"]}
WORKFLOW = SETTINGS["awx_failover_workflow"]


def survey(name):
    return read_json("awx", "surveys", name + ".json")


def role_options(role, seen=None):
    """Options of a role's main entry point and of the roles it depends on."""
    seen = set() if seen is None else seen
    if role in seen:
        return {}
    seen.add(role)
    specs = read_yaml("roles", role, "meta", "argument_specs.yml")
    options = dict(specs["argument_specs"]["main"].get("options") or {})
    meta = read_yaml("roles", role, "meta", "main.yml") or {}
    for dep in meta.get("dependencies") or []:
        dep_name = dep["role"] if isinstance(dep, dict) else dep
        for name, spec in role_options(dep_name, seen).items():
            options.setdefault(name, spec)
    return options


def playbook_roles(playbook):
    """Roles a playbook runs: roles: sections and include_role/import_role tasks."""
    plays = read_yaml(playbook)
    roles = []

    def walk(tasks):
        for task in tasks or []:
            for key in ("ansible.builtin.include_role", "ansible.builtin.import_role", "include_role", "import_role"):
                if key in task:
                    roles.append(task[key]["name"])
            for key in ("block", "rescue", "always"):
                walk(task.get(key))

    for play in plays:
        for role in play.get("roles") or []:
            roles.append(role["role"] if isinstance(role, dict) else role)
        for section in ("pre_tasks", "tasks", "post_tasks"):
            walk(play.get(section))
    return roles


def playbook_options(playbook):
    options = {}
    for role in playbook_roles(playbook):
        options.update(role_options(role))
    return options


def survey_default_of(spec):
    """The survey answer that means the role's default."""
    default = spec.get("default")
    kind = spec.get("type", "str")
    if kind == "bool":
        return "true" if default else "false"
    if kind == "list":
        assert default in (None, []), "a list survey question needs the default []"
        return ""
    return default


# --- surveys -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted({t["survey"] for t in TEMPLATES.values()}))
def test_survey_files_are_valid_survey_specs(name):
    data = survey(name)
    assert set(data) == {"name", "description", "spec"}
    assert data["name"] and isinstance(data["spec"], list) and data["spec"], "a survey needs questions"
    variables = [item["variable"] for item in data["spec"]]
    assert len(variables) == len(set(variables)), "a variable asked twice"
    for item in data["spec"]:
        where = "%s.json: %s" % (name, item.get("variable"))
        assert item["type"] in SURVEY_TYPES, where
        assert item["question_name"] and item["question_description"], where
        assert isinstance(item["required"], bool), where
        assert re.fullmatch(r"[a-z_][a-z0-9_]*", item["variable"]), where
        if item["type"] in ("multiplechoice", "multiselect"):
            assert isinstance(item["choices"], list) and all(isinstance(c, str) for c in item["choices"]), where
            assert item["default"] in item["choices"], where
        if item["type"] in ("text", "textarea", "integer"):
            assert isinstance(item["min"], int) and isinstance(item["max"], int), where
            assert item["min"] <= (len(item["default"]) if item["type"] != "integer" else item["default"]) <= item["max"]
        assert item["type"] != "password", "secrets come from the credential, never from a survey"


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_survey_questions_match_the_argument_specs_of_the_playbooks_roles(template):
    options = playbook_options(TEMPLATES[template]["playbook"])
    for item in survey(TEMPLATES[template]["survey"])["spec"]:
        var = item["variable"]
        assert var in options, "%s asks %s, which no role of %s declares" % (
            template, var, TEMPLATES[template]["playbook"])
        spec = options[var]
        kind = spec.get("type", "str")
        if spec.get("choices"):
            assert item["type"] == "multiplechoice", var
            assert sorted(item["choices"]) == sorted(str(c) for c in spec["choices"]), var
        elif kind == "bool":
            assert item["type"] == "multiplechoice" and set(item["choices"]) == BOOL_CHOICES, var
        elif kind == "int":
            assert item["type"] == "integer", var
        elif kind in ("str", "list", "path"):
            assert item["type"] in ("text", "textarea"), var
        else:
            pytest.fail("%s: no survey form for the type %s" % (var, kind))
        # Survey answers are extra vars: they beat inventory values. The default
        # must be the role's, so that an untouched survey changes nothing.
        assert item["default"] == survey_default_of(spec), var


def test_the_workflow_survey_is_the_failover_survey():
    assert WORKFLOW["survey"] == TEMPLATES["baileys-dr failover"]["survey"]


def test_no_survey_asks_for_a_secret_or_the_production_override():
    for name in {t["survey"] for t in TEMPLATES.values()}:
        for item in survey(name)["spec"]:
            assert not re.search(r"password|token|dsn|secret", item["variable"]), item["variable"]
            assert item["variable"] != "baileys_rehearsal_allow_production"


def _uses(var):
    """(path:line, line) of every use of `var` in role tasks and playbooks."""
    pattern = re.compile(r"\b%s\b" % re.escape(var))
    for base in ("roles", "playbooks"):
        for dirpath, _dirs, files in os.walk(os.path.join(ROOT, base)):
            if os.sep + "meta" in dirpath or os.sep + "defaults" in dirpath:
                continue
            for fname in sorted(files):
                if fname.endswith(".yml"):
                    with open(os.path.join(dirpath, fname), encoding="utf-8") as fh:
                        for number, line in enumerate(fh, 1):
                            if pattern.search(line) and not line.lstrip().startswith("#"):
                                yield "%s:%d" % (os.path.relpath(os.path.join(dirpath, fname), ROOT), number), line


def _bool_misuses(var):
    """Uses of `var` in an expression without `| bool`.

    Survey answers and `-e name=value` arrive as the strings "true"/"false";
    `not "false"` is False. A whole value given to a module option is fine
    (the module converts it); an expression must go through the bool filter.
    """
    bad = []
    pattern = re.compile(r"\b%s\b" % re.escape(var))
    whole = re.compile(r'(^\s*|[{,]\s*)[\w.]+:\s*"\{\{\s*%s\s*\}\}"' % re.escape(var))
    for where, line in _uses(var):
        for match in pattern.finditer(line):
            after = line[match.end():]
            if re.match(r"\s*(\|\s*default\([^)]*\)\s*)?\|\s*bool\b", after) or after.startswith("=") or whole.search(line):
                continue
            bad.append("%s: %s" % (where, line.strip()))
    return bad


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_boolean_survey_answers_are_read_through_the_bool_filter(template):
    options = playbook_options(TEMPLATES[template]["playbook"])
    bad = []
    for item in survey(TEMPLATES[template]["survey"])["spec"]:
        if options.get(item["variable"], {}).get("type") == "bool":
            bad += _bool_misuses(item["variable"])
    assert not bad, "a survey answer 'false' is a true string here:\n" + "\n".join(bad)


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_list_survey_answers_reach_the_modules_whole(template):
    """A list asked as text arrives as "a,b": only a module option (which splits it) may read it."""
    options = playbook_options(TEMPLATES[template]["playbook"])
    bad = []
    for item in survey(TEMPLATES[template]["survey"])["spec"]:
        var = item["variable"]
        if options.get(var, {}).get("type") != "list":
            continue
        # "or __baileys_dr_companies": an empty answer falls back to the host's list (a list, never a string).
        whole = re.compile(r'^\s*[\w.]+:\s*"\{\{\s*%s(\s+or\s+__baileys_dr_companies)?(\s+or\s+omit)?\s*\}\}"\s*$' % re.escape(var))
        bad += ["%s: %s" % (where, line.strip()) for where, line in _uses(var) if not whole.match(line)]
    assert not bad, "a comma-separated answer is a string here:\n" + "\n".join(bad)


# --- job templates, credential type --------------------------------------------------------------

EXPECTED_PLAYBOOKS = {"failover", "failback", "snapshot", "cleanup", "health", "rehearsal"}


def test_there_is_a_job_template_for_every_dr_playbook():
    assert {os.path.basename(t["playbook"])[:-4] for t in TEMPLATES.values()} == EXPECTED_PLAYBOOKS


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_every_job_template_playbook_exists_and_targets_the_application_hosts(template):
    path = os.path.join(ROOT, TEMPLATES[template]["playbook"])
    assert os.path.isfile(path), "%s runs %s, which does not exist" % (template, TEMPLATES[template]["playbook"])
    plays = read_yaml(TEMPLATES[template]["playbook"])
    assert all(play.get("hosts") == "baileys_app" for play in plays)
    assert TEMPLATES[template]["inventory"] in SETTINGS["awx_inventories"]


def test_every_playbook_runs_without_prompting():
    for name in os.listdir(os.path.join(ROOT, "playbooks")):
        for play in read_yaml("playbooks", name) or []:
            assert "vars_prompt" not in play, name
    for base in ("playbooks", "roles"):
        for dirpath, _dirs, files in os.walk(os.path.join(ROOT, base)):
            for fname in files:
                if fname.endswith(".yml"):
                    with open(os.path.join(dirpath, fname), encoding="utf-8") as fh:
                        text = fh.read()
                    assert not re.search(r"^\s*(- )?(ansible\.builtin\.)?pause:", text, re.M), fname
                    assert not re.search(r"^\s*vars_prompt:", text, re.M), fname


def test_ansible_lint_rejects_prompting(tmp_path):
    config = read_yaml(".ansible-lint")
    assert "no-prompting" in config["enable_list"] and config["profile"] == "production"
    playbook = tmp_path / "prompt.yml"
    playbook.write_text(
        "---\n- name: Ask\n  hosts: localhost\n  gather_facts: false\n"
        "  vars_prompt:\n    - name: answer\n      prompt: Really?\n      private: false\n"
        "  tasks:\n    - name: Show\n      ansible.builtin.debug:\n        var: answer\n")
    run = subprocess.run([os.path.join(VENV_BIN, "ansible-lint"), "-c", os.path.join(ROOT, ".ansible-lint"),
                          "--offline", str(playbook)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "no-prompting" in run.stdout + run.stderr


CREDENTIAL_TYPE = read_json("awx", "credential_types", "baileys_dr_secrets.json")


def test_credential_type_injects_the_three_secrets_under_the_names_the_project_reads():
    fields = {f["id"]: f for f in CREDENTIAL_TYPE["inputs"]["fields"]}
    assert all(f["secret"] for f in fields.values()), "every input is a secret"
    assert set(CREDENTIAL_TYPE["inputs"]["required"]) <= set(fields)
    injectors = CREDENTIAL_TYPE["injectors"]
    assert injectors["extra_vars"] == {
        "baileys_dr_db_password": "{{ db_password }}",
        "baileys_dr_notify_telegram_bot_token": "{{ telegram_bot_token }}",
    }
    assert injectors["env"] == {"BAILEYS_DR_SENTRY_DSN": "{{ sentry_dsn }}"}
    shared = role_options("baileys_dr")
    for var in injectors["extra_vars"]:
        assert var in shared, var
    for value in list(injectors["extra_vars"].values()) + list(injectors["env"].values()):
        assert re.fullmatch(r"\{\{ (\w+) \}\}", value).group(1) in fields
    # The Sentry callback reads that variable.
    with open(os.path.join(ROOT, "callback_plugins", "baileys_dr_sentry.py"), encoding="utf-8") as fh:
        assert "name: BAILEYS_DR_SENTRY_DSN" in fh.read()


# --- schedules -----------------------------------------------------------------------------------


def parse_rrule(text):
    """AWX's form: 'DTSTART;TZID=UTC:YYYYmmddTHHMMSS RRULE:K=V;...'."""
    match = re.fullmatch(r"DTSTART;TZID=UTC:(\d{8}T\d{6}) RRULE:(\S+)", text)
    assert match, "not an AWX rrule in UTC: %r" % text
    start = datetime.datetime.strptime(match.group(1), "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
    rule = dict(part.split("=", 1) for part in match.group(2).split(";"))
    assert set(rule) <= {"FREQ", "INTERVAL", "BYDAY"}, rule
    return start, rule


DAYS = ["MO", "TU", "WE", "TH", "FR", "SA", "SU"]


def rrule_occurrences(text, until):
    start, rule = parse_rrule(text)
    interval = int(rule.get("INTERVAL", "1"))
    step = {"MINUTELY": datetime.timedelta(minutes=interval), "HOURLY": datetime.timedelta(hours=interval),
            "DAILY": datetime.timedelta(days=interval), "WEEKLY": datetime.timedelta(weeks=interval)}[rule["FREQ"]]
    if "BYDAY" in rule:
        assert rule["FREQ"] == "WEEKLY" and rule["BYDAY"] == DAYS[start.weekday()], "DTSTART must be on BYDAY"
    when, out = start, []
    while when < until:
        out.append(when)
        when += step
    return out


def cron_field(spec, value):
    for part in spec.split(","):
        rng, _, step = part.partition("/")
        if rng == "*":
            low, high = 0, 59
        elif "-" in rng:
            low, high = map(int, rng.split("-"))
        else:
            low = high = int(rng)
        if low <= value <= high and (value - low) % int(step or 1) == 0:
            return True
    return False


def cron_occurrences(crontab, since, until):
    minute, hour, dom, month, dow = crontab.split()
    assert (dom, month) == ("*", "*")
    when, out = since, []
    while when < until:
        if cron_field(minute, when.minute) and cron_field(hour, when.hour) and (
                dow == "*" or cron_field(dow, (when.weekday() + 1) % 7)):
            out.append(when)
        when += datetime.timedelta(minutes=1)
    return out


def test_cleanup_runs_daily_at_three_utc():
    start, rule = parse_rrule(SCHEDULES["baileys-dr cleanup"]["rrule"])
    assert rule == {"FREQ": "DAILY", "INTERVAL": "1"} and (start.hour, start.minute, start.second) == (3, 0, 0)


def test_snapshot_runs_every_fifteen_minutes():
    _start, rule = parse_rrule(SCHEDULES["baileys-dr snapshot"]["rrule"])
    assert rule == {"FREQ": "MINUTELY", "INTERVAL": "15"}


def test_health_runs_every_five_minutes():
    _start, rule = parse_rrule(SCHEDULES["baileys-dr health"]["rrule"])
    assert rule == {"FREQ": "MINUTELY", "INTERVAL": "5"}


def test_rehearsal_runs_weekly_on_staging():
    schedule = SCHEDULES["baileys-dr rehearsal"]
    _start, rule = parse_rrule(schedule["rrule"])
    assert rule["FREQ"] == "WEEKLY" and rule.get("INTERVAL", "1") == "1"
    assert schedule["inventory"] == "staging" and TEMPLATES["baileys-dr rehearsal"]["inventory"] == "staging"
    assert SETTINGS["awx_inventories"]["staging"]["source_path"].startswith("inventories/staging/")


@pytest.mark.parametrize("template", sorted(SCHEDULES))
def test_the_sentry_monitor_crontab_is_the_same_schedule_as_the_rrule(template):
    schedule = SCHEDULES[template]
    start, _rule = parse_rrule(schedule["rrule"])
    since = datetime.datetime(2026, 3, 2, tzinfo=UTC)  # a Monday, after every DTSTART
    until = since + datetime.timedelta(days=14)
    expected = [t for t in rrule_occurrences(schedule["rrule"], until) if t >= since]
    assert expected and cron_occurrences(schedule["crontab"], since, until) == expected
    assert schedule["monitor_slug"].startswith("baileys-dr-")
    # Schedules pass the monitor as extra vars: the template must accept them.
    assert TEMPLATES[template]["ask_variables"]


def test_the_snapshot_never_starts_with_the_cleanup():
    since = datetime.datetime(2026, 3, 2, tzinfo=UTC)
    until = since + datetime.timedelta(days=7)
    cleanup = set(rrule_occurrences(SCHEDULES["baileys-dr cleanup"]["rrule"], until))
    snapshot = set(rrule_occurrences(SCHEDULES["baileys-dr snapshot"]["rrule"], until))
    assert not cleanup & snapshot


# --- the failover workflow -------------------------------------------------------------------------


def test_the_failover_workflow_needs_an_approval_after_a_check_mode_plan():
    nodes = {n["identifier"]: n for n in WORKFLOW["nodes"]}
    children = {ident: [c["identifier"] for kind in ("success_nodes", "failure_nodes", "always_nodes")
                        for c in (node.get("related") or {}).get(kind, [])]
                for ident, node in nodes.items()}
    parents = {ident: [p for p, kids in children.items() if ident in kids] for ident in nodes}
    roots = [ident for ident in nodes if not parents[ident]]
    assert roots == ["plan"]
    plan = nodes["plan"]
    assert plan["unified_job_template"]["name"] == "baileys-dr failover" and plan["job_type"] == "check"
    assert TEMPLATES["baileys-dr failover"]["ask_job_type"], "the node's job_type needs the template to ask for it"
    approvals = [i for i, n in nodes.items() if n["unified_job_template"]["type"] == "workflow_approval"]
    assert len(approvals) == 1
    approval = nodes[approvals[0]]
    assert approval["unified_job_template"]["timeout"] > 0
    assert parents[approvals[0]] == ["plan"] and approvals[0] in [
        c["identifier"] for c in plan["related"]["success_nodes"]], "the plan must succeed before anyone approves"
    real = [i for i, n in nodes.items() if n["unified_job_template"]["name"] == "baileys-dr failover"
            and n.get("job_type", "run") == "run"]
    assert real == ["failover"]
    # Every path to the real failover goes through the approval, on success only.
    assert parents["failover"] == [approvals[0]]
    assert [c["identifier"] for c in approval["related"]["success_nodes"]] == ["failover"]
    assert not approval["related"].get("always_nodes") and not approval["related"].get("failure_nodes")
    health = nodes["health"]
    assert health["unified_job_template"]["name"] == "baileys-dr health"
    # A failed failover keeps the workflow failed: no always/failure child handles it.
    assert [c["identifier"] for c in nodes["failover"]["related"]["success_nodes"]] == ["health"]
    assert not nodes["failover"]["related"].get("always_nodes") and not nodes["failover"]["related"].get(
        "failure_nodes")
    assert health["extra_data"] == {"baileys_health_fail_on": "never"}
    for node in nodes.values():
        if node["unified_job_template"]["type"] == "job_template":
            assert node["unified_job_template"]["name"] in TEMPLATES


# --- the playbook itself -----------------------------------------------------------------------------


def run_configure(*extra, tmp_path):
    env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    return subprocess.run([PLAYBOOK_CMD, os.path.join(AWX, "configure.yml"), *extra], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=300)


def test_configure_renders_surveys_and_untemplated_injectors_without_an_awx(tmp_path):
    out = tmp_path / "awx.json"
    run = run_configure("-e", "awx_render_to=%s" % out, tmp_path=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    rendered = json.loads(out.read_text())
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    # AWX, not Ansible, fills the injectors in per job.
    assert rendered["credential_type"]["injectors"] == CREDENTIAL_TYPE["injectors"]
    for template in TEMPLATES.values():
        assert rendered["surveys"][template["survey"]] == survey(template["survey"])
    assert rendered["workflow"]["nodes"][0]["unified_job_template"]["organization"]["name"] == \
        SETTINGS["awx_organization"]


def test_configure_refuses_bad_settings_naming_them(tmp_path):
    run = run_configure("-e", "awx_render_to=%s" % (tmp_path / "x.json"), "-e", "awx_execution_environment_pull=often",
                        tmp_path=tmp_path)
    assert run.returncode != 0 and "awx_execution_environment_pull" in run.stdout
    run = run_configure(tmp_path=tmp_path)
    assert run.returncode != 0 and "awx_project_scm_url" in run.stdout
    assert not (tmp_path / "x.json").exists()


def test_configure_passes_the_syntax_check():
    run = subprocess.run([PLAYBOOK_CMD, "--syntax-check", os.path.join(AWX, "configure.yml")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr


# --- the execution environment's definition ------------------------------------------------------------


def pins(path):
    out = {}
    with open(os.path.join(ROOT, path), encoding="utf-8") as fh:
        for line in fh:
            line = line.split("#", 1)[0].strip()
            if line:
                name, _, version = line.partition("==")
                out[re.sub(r"\[.*\]", "", name).lower()] = version
    return out


def test_execution_environment_pins_agree_with_the_control_node():
    ee = read_yaml("execution-environment.yml")
    control = pins("requirements.txt")
    runtime = pins(ee["dependencies"]["python"])
    assert "ansible" in runtime, "the collections come from the ansible bundle"
    for name, version in runtime.items():
        assert control.get(name) == version, "%s: %s in the EE, %s on the control node" % (
            name, version, control.get(name))
    assert ee["dependencies"]["ansible_core"]["package_pip"] == "ansible-core==" + control["ansible-core"]
    assert "galaxy" not in ee["dependencies"], "nothing may come from Ansible Galaxy"


def test_execution_environment_enables_callbacks_that_exist():
    ee = read_yaml("execution-environment.yml")
    steps = ee["additional_build_steps"]["append_final"]
    env = dict(step[4:].split("=", 1) for step in steps if step.startswith("ENV "))
    enabled = env["ANSIBLE_CALLBACKS_ENABLED"].split(",")
    # Under AWX the variable replaces ansible.cfg's list: it must hold every
    # callback the project enables, and every project callback that needs enabling.
    parser = configparser.ConfigParser()
    parser.read(os.path.join(ROOT, "ansible.cfg"))
    in_cfg = [c.strip() for c in parser.get("defaults", "callbacks_enabled", fallback="").split(",") if c.strip()]
    assert set(in_cfg) <= set(enabled), "ansible.cfg enables %s" % in_cfg
    for fname in os.listdir(os.path.join(ROOT, "callback_plugins")):
        if fname.endswith(".py"):
            with open(os.path.join(ROOT, "callback_plugins", fname), encoding="utf-8") as fh:
                if "CALLBACK_NEEDS_ENABLED = True" in fh.read():
                    assert fname[:-3] in enabled, fname
    site = os.path.dirname(os.path.dirname(yaml.__file__))
    for name in enabled:
        if "." in name:
            namespace, collection, plugin = name.split(".")
            path = os.path.join(site, "ansible_collections", namespace, collection, "plugins", "callback",
                                plugin + ".py")
        else:
            path = os.path.join(ROOT, "callback_plugins", name + ".py")
        assert os.path.isfile(path), "%s is enabled but %s does not exist" % (name, path)
    assert env["ANSIBLE_CALLBACK_PLUGINS"].split(":")[0] == "/runner/project/callback_plugins"
