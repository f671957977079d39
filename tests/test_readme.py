"""README.md is what a user reads first: its claims about defaults must be the scripts' own, its links must lead
somewhere, and it stays short. The scripts are read with ast (their config globals, as test_presets does), never run."""
import ast
import glob
import os
import re
import subprocess

import pytest

from conftest import ROOT

README = os.path.join(ROOT, 'README.md')
TEST_COMMAND = 'python -m pytest -q -n auto tests'
# the data folder of the machines this project is developed on, which users do not have: built here, not written out,
# so that this file does not hold the string it looks for
PRIVATE_PATHS = ('..' + '/shared', '/work' + '/shared')
ABSENT = object()  # a '–' cell: the script has no such setting


def readme():
    return open(README, encoding='utf-8').read()


def script_globals(script):
    """{name: value} of the config globals a script assigns before it execs configurator.py (at the top level, or at
    the top of its `if __name__ == '__main__':` block), each value as the Python literal the file writes."""
    def collect(body):
        found = {}
        for node in body:
            if isinstance(node, ast.If) and 'configurator.py' not in ast.unparse(node.test) and not found:
                inner = collect(node.body)  # ideal_machines.py: its settings live inside `if __name__ == ...`
                if inner:
                    return inner
            if 'configurator.py' in ast.unparse(node):
                return found
            if isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets):
                try:
                    value = ast.literal_eval(node.value)
                except ValueError:  # config_keys = [...], computed
                    continue
                found.update({t.id: value for t in node.targets})
        return found

    return collect(ast.parse(open(os.path.join(ROOT, script), encoding='utf-8').read()).body)


def preset_settings():
    """{script: [(preset file, {key: value})]} for every dataset's preset in config/ (the GPU and CPU files train_dit.py
    chooses from, its PRESETS; other config files are a user's choice), by the script its comment names."""
    names = script_globals('train_dit.py')['PRESETS'].values()
    chosen = {f'{name}{kind}.py' for name in names for kind in ('', '_cpu')}
    presets = {}
    for path in sorted(glob.glob(os.path.join(ROOT, 'config', '*.py'))):
        if os.path.basename(path) not in chosen:
            continue
        text = open(path, encoding='utf-8').read()
        script = re.search(r'(\w+\.py) config/', text).group(1)
        values = {t.id: ast.literal_eval(node.value) for node in ast.parse(text).body if isinstance(node, ast.Assign)
                  for t in node.targets}
        presets.setdefault(script, []).append((os.path.basename(path), values))
    return presets


def defaults_tables(text):
    """The README's tables of defaults: a header `| script | `key` | `key` | ...`, then one row per script whose cells
    hold the default as the first `code` span (read as a Python literal, else as a string) or '–' (no such setting).
    Returns [(script, key, value or ABSENT)]."""
    claims = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        if not line.startswith('| script |') or not all(re.fullmatch(r'`\w+`', c) for c in cells[1:]):
            continue
        keys = [c.strip('`') for c in cells[1:]]
        for row in lines[i + 2:]:
            if not row.startswith('|'):
                break
            cells = [c.strip() for c in row.strip().strip('|').split('|')]
            assert len(cells) == len(keys) + 1, f'README: a row of the defaults table has the wrong width: {row}'
            script = cells[0].strip('`')
            for key, cell in zip(keys, cells[1:]):
                if cell == '–':
                    claims.append((script, key, ABSENT))
                    continue
                code = re.search(r'`([^`]*)`', cell)
                assert code, f'README: the cell for {key} of {script} holds no `value`: {cell!r}'
                try:
                    value = ast.literal_eval(code.group(1))
                except (ValueError, SyntaxError):
                    value = code.group(1)
                claims.append((script, key, value))
    return claims


def test_readme_is_short():
    """Catches the measurement record creeping back into the README (it belongs in docs/)."""
    n = len(open(README, encoding='utf-8').read().splitlines())
    assert 0 < n <= 300, f'README.md has {n} lines, more than 300'


def test_defaults_in_the_readme_are_the_scripts():
    """Every default the README's tables state is the script's global, and no preset of that script sets it otherwise
    (the README says they hold for every dataset and preset); '–' means the script has no such setting.
    Catches a wrong claim such as logit-normal t for the UNet scripts, which draw t uniformly."""
    claims = defaults_tables(readme())
    stated = {(script, key) for script, key, _ in claims}
    for script in ('train_dit.py', 'train_flow_unet.py', 'train_class_cfg.py', 'train_denoiser.py'):
        assert (script, 't_sampling') in stated, f'README: no t_sampling default stated for {script}'
    assert ('sample.py', 'steps') in stated and ('sample.py', 'cfg') in stated
    presets = preset_settings()
    for script, key, value in claims:
        config = script_globals(script)
        assert config, f'README names {script}, whose config globals were not found'
        if value is ABSENT:
            assert key not in config, f'README: {script} has no {key}, but the script sets {key} = {config[key]!r}'
            continue
        assert key in config, f'README: {script} has no setting {key}'
        assert config[key] == value and type(config[key]) is type(value), \
            f'README says {script} defaults to {key} = {value!r}; the script says {config[key]!r}'
        for preset, settings in presets.get(script, []):
            assert settings.get(key, value) == value, \
                f'README says {key} = {value!r} for every preset of {script}; config/{preset} sets {settings[key]!r}'


def test_the_test_command_is_the_one_ci_runs():
    """Catches the README and .ci/run drifting apart: CI must run what the README tells a user to run."""
    assert re.search(rf'^    {re.escape(TEST_COMMAND)}$', readme(), re.M), f'README: no line `{TEST_COMMAND}`'
    ci = [line.strip() for line in open(os.path.join(ROOT, '.ci', 'run'), encoding='utf-8') if 'pytest' in line]
    assert ci == [TEST_COMMAND], f'.ci/run runs {ci}, the README {TEST_COMMAND!r}'


def tracked_files():
    """The repository's files (git's list when there is one, else a walk without data, outputs and environments)."""
    try:
        out = subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        files = [os.path.join(ROOT, f) for f in out.splitlines()]
    except (OSError, subprocess.CalledProcessError):
        files = []
    if not files:
        skip = {'.git', '.venv', '.venv-ci', 'data', 'out', '__pycache__', '.pytest_cache'}
        for d, dirs, names in os.walk(ROOT):
            dirs[:] = [x for x in dirs if x not in skip and not x.startswith('out')]
            files += [os.path.join(d, n) for n in names]
    return [f for f in files if f.endswith(('.py', '.md')) and os.path.isfile(f)]


def test_no_private_data_path():
    """Catches a path to this project's own data folder in a file users get: they have their own --data_dir."""
    files = tracked_files()
    assert any(f.endswith('README.md') for f in files) and any(f.endswith('model.py') for f in files)
    bad = [f'{os.path.relpath(f, ROOT)}: {p}' for f in files for p in PRIVATE_PATHS
           if p in open(f, encoding='utf-8').read()]
    assert not bad, f'paths users do not have: {bad}'


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped (not - or _), spaces to hyphens."""
    return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


@pytest.mark.parametrize('doc', ['README.md', *sorted(os.path.relpath(p, ROOT) for p in
                                                       glob.glob(os.path.join(ROOT, 'docs', '*.md')))])
def test_links_lead_somewhere(doc):
    """Every relative link and image of the README and docs/ names a file that exists, and every #anchor a heading of
    that file. Catches a link to a file that is not in the repository, or to a section that was renamed."""
    text = open(os.path.join(ROOT, doc), encoding='utf-8').read()
    targets = re.findall(r'\]\(([^)\s]+)\)', text) + re.findall(r'<img src="([^"]+)"', text)
    assert targets or doc != 'README.md'
    for target in targets:
        if re.match(r'[a-z]+:', target):  # https:, mailto:
            continue
        path, _, anchor = target.partition('#')
        full = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), path)) if path else os.path.join(ROOT, doc)
        assert os.path.exists(full), f'{doc} links to {target}, which does not exist'
        if anchor:
            headings = re.findall(r'^#+ (.+)$', open(full, encoding='utf-8').read(), re.M)
            assert anchor in {slug(h) for h in headings}, f'{doc} links to {target}: no such heading'
