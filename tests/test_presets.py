"""Presets in config/ set only keys their script has: configurator.py execs a preset as it is, so a typo there
(`n_layer = 3`) would be ignored without a word."""
import ast
import glob
import os
import re

import pytest

from conftest import ROOT


def config_keys(script):
    """The names a script assigns at the top level before it execs configurator.py: its config keys."""
    tree = ast.parse(open(os.path.join(ROOT, script)).read())
    keys = set()
    for node in tree.body:
        if isinstance(node, ast.Expr) and 'configurator.py' in ast.unparse(node):
            return keys
        if isinstance(node, ast.Assign):
            keys |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    raise AssertionError(f'{script} does not exec configurator.py')


@pytest.mark.parametrize('preset', sorted(glob.glob(os.path.join(ROOT, 'config', '*.py'))), ids=os.path.basename)
def test_preset_keys_exist_in_its_script(preset):
    """Catches a mistyped or stale key in a preset (the script named in its comment: `python train_dit.py config/...`)."""
    text = open(preset).read()
    script = re.search(r'(\w+\.py) config/', text).group(1)
    keys = config_keys(script)
    assert {'out_dir', 'batch_size', 'learning_rate'} <= keys  # the parse finds the script's config globals
    assigned = [t.id for node in ast.parse(text).body if isinstance(node, ast.Assign) for t in node.targets]
    assert assigned and all(isinstance(node, ast.Assign) for node in ast.parse(text).body)  # plain assignments only
    assert set(assigned) <= keys, f'{os.path.basename(preset)} sets keys {script} does not have: {set(assigned) - keys}'
