"""
nanoGPT-style configuration, exec'd by every script after its globals:

    python train_dit.py config/dit_mnist.py --batch_size=64 --compile=True
    python sample.py --steps=50 --cfg=2.0 --gif
    python train_dit.py --help      # every setting: its default, its domain and the comment on its line

The script names its settings in `config_keys` (computed here when it does not) and the domain of each number in
`config_domains`: name -> a kind of _KINDS below or a closed range (lo, hi); a tuple is checked element by element.
A positional argument is a config file, run in a namespace holding the current settings; it may assign settings
only. --key=value overrides a setting, the value parsed as a Python literal when it is one (else kept as a string);
a bare --flag sets a boolean to True. A value must have its default's type (an int is taken for a float; a default
of None means "not set" and takes any value) and lie in its domain. Each error is one line on stderr, exit code 2.

A script may define preset_file(), called once the command line is read: the config file it names (or '') is applied
under what the user set, so the order of precedence is the script's defaults, the preset, config files, --key=value.
--help prints the settings then in effect. `config_given` names the settings the user gave (assigned in a config file
or --key=value), even at their default value.
"""
import ast as _ast
import builtins as _builtins
import difflib as _difflib
import os as _os
import re as _re
import sys as _sys
import tokenize as _tokenize
import traceback as _traceback
import types as _types

_KINDS = {  # kind: (lo, hi, lo allowed, hi allowed, integer)
    'count': (1, 10 ** 7, True, True, True),  # sizes, counts, intervals
    'count0': (0, 10 ** 7, True, True, True),  # counts where 0 means "off" or "the default" (the comment says which)
    'size': (1, 4096, True, True, True),  # image sides, network widths and depths
    'seed': (0, 2 ** 32 - 1, True, True, True),
    'rate': (0, 10, False, True, False),  # learning rates
    'positive': (0, 100, False, True, False),  # scales that cannot be 0: clipping norms, time shifts
    'nonneg': (0, 100, True, True, False),  # weight decay, guidance, noise levels
    'prob': (0, 1, True, True, False),  # probabilities
    'decay': (0, 1, True, False, False),  # EMA decays, Adam betas
}


def _config_error(msg):
    print(f'error: {msg}', file=_sys.stderr)
    _sys.exit(2)


def _show(v):
    """A value as it is written on the command line."""
    if isinstance(v, str):
        try:
            _ast.literal_eval(v)
            return repr(v)  # a string that would parse as a literal: quoted
        except (SyntaxError, ValueError):
            return v or "''"
    return repr(v).replace(' ', '')


def _domain(rule):
    """(lo, hi, lo allowed, hi allowed, integer) of a kind or of a closed range (lo, hi)."""
    return _KINDS[rule] if isinstance(rule, str) else (*rule, True, True, False)


def _domain_text(rule, short=False):
    lo, hi, lo_ok, hi_ok, integer = _domain(rule)
    if short:  # [1, 4096], (0, 10], [0, 1)
        return f'{"[" if lo_ok else "("}{lo}, {hi}{"]" if hi_ok else ")"}'
    return f'{"an integer" if integer else "a number"} {">=" if lo_ok else ">"} {lo} (and {"<=" if hi_ok else "<"} {hi})'


def _in_domain(value, rule):
    lo, hi, lo_ok, hi_ok, integer = _domain(rule)
    for v in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
            return False
        if not ((lo < v or lo_ok and v == lo) and (v < hi or hi_ok and v == hi)):  # False for nan too
            return False
    return True


def _print_help():
    """The script's docstring, then its config block as --key=value (in effect)  domain  comment, under its own heading
    comments; the block is read from the source, from a '# ---' line or a blank one to config_domains / config_keys /
    the exec of this file."""
    path = globals().get('__file__') or _sys.argv[0]
    lines = open(path).read().splitlines()
    end = next(i for i, line in enumerate(lines) if line.strip().startswith(('config_domains', 'config_keys'))
               or 'configurator.py' in line and 'exec(' in line)
    start = end
    while start > 0 and lines[start - 1].strip() and not lines[start - 1].strip().startswith('# ---'):
        start -= 1
    rows = []
    for line in lines[start:end]:
        m = _re.match(r'\s*(\w+)\s*=(?!=)', line)
        if m and m.group(1) in _config_keys:
            key = m.group(1)
            comment = [t.string[1:].strip() for t in _tokenize.generate_tokens(iter([line.strip() + '\n']).__next__)
                       if t.type == _tokenize.COMMENT]
            rule = globals().get('config_domains', {}).get(key)
            value = globals()[key]
            domain = ('each in ' if isinstance(value, (tuple, list)) else '') + _domain_text(rule, short=True) if rule else ''
            rows.append((f'--{key}={_show(value)}', domain, comment[0] if comment else ''))
        elif line.strip().startswith('#'):
            rows.append((line.strip(),))
    w, dw = (min(30, max([len(r[i]) for r in rows if len(r) > 1] + [0])) for i in (0, 1))
    print((_ast.get_docstring(_ast.parse('\n'.join(lines))) or '').strip() + '\n')  # (exec'ing this file set __doc__)
    print(f'settings: python {_os.path.basename(path)} [config_file.py ...] [--key=value ...]; a bare --flag sets a '
          f'boolean to True; [lo, hi] is the domain of a number')
    given = [a for a in _sys.argv[1:] if a not in ('--help', '-h')]
    print(f'values in effect with {" ".join(given) or "no arguments"}'
          + (f' (preset {_os.path.relpath(config_preset)}, under the config files and --key=value)' if config_preset else ''))
    for r in rows:
        print(r[0] if len(r) == 1 else f'  {r[0]:<{w}}  {r[1]:<{dw}}  {r[2]}'.rstrip())


def _config_set(key, new, where=''):
    """Set config global `key` to `new` after checking the key and the type against the default. where: '' for an
    override (named --key), 'FILE: ' for a config file."""
    flag = '' if where else '--'
    if key not in _config_keys:
        close = _difflib.get_close_matches(key, _config_keys, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(flag + c for c in close)}?" if close else ''
        _config_error(f'{where}unknown config key {key!r}{hint} (valid keys: {", ".join(_config_keys)})')
    default = _config_defaults[key]
    if isinstance(default, float) and type(new) is int:
        new = float(new)
    if isinstance(default, tuple) and isinstance(new, list) or isinstance(default, list) and isinstance(new, tuple):
        new = type(default)(new)
    if default is not None and type(new) is not type(default):
        _config_error(f'{where}{flag}{key} expects {type(default).__name__} (default {default!r}), '
                      f'got {type(new).__name__} {new!r}')
    globals()[key] = new


def _config_file(path, keep=()):
    """Run a config file in a namespace seeded with the current settings, then take what it assigned, except the keys
    in keep. The keys it assigns count as set by the user."""
    if not _os.path.isfile(path):
        _config_error(f'config file {path!r} not found (presets are in config/, overrides are written --key=value)')
    ns = {k: globals()[k] for k in _config_keys}
    try:
        exec(_builtins.compile(open(path).read(), path, 'exec'), ns)  # (a script's `compile` setting hides the builtin)
    except Exception as e:
        line = e.lineno if isinstance(e, SyntaxError) else \
            next((f.lineno for f in reversed(_traceback.extract_tb(e.__traceback__)) if f.filename == path), None)
        msg = (e.msg if isinstance(e, SyntaxError) else str(e)).strip().split('\n')[0]
        _config_error(f'{path}{f" line {line}" if line else ""}: {type(e).__name__}: {msg}')
    for key, value in ns.items():
        if not key.startswith('_') and not isinstance(value, _types.ModuleType) and key not in keep:
            _config_set(key, value, where=f'{path}: ')
    return {n.id for n in _ast.walk(_ast.parse(open(path).read())) if isinstance(n, _ast.Name)
            and isinstance(n.ctx, _ast.Store) and n.id in _config_keys}  # what the file assigns


_config_keys = globals()['config_keys'] if 'config_keys' in globals() else \
    [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (bool, int, float, str, tuple, list, type(None)))]
_config_defaults = {k: globals()[k] for k in _config_keys}
config_given = set()  # the settings the user gave: assigned in a config file or --key=value (not by a preset)
for _arg in _sys.argv[1:]:
    if _arg in ('--help', '-h'):
        continue
    if not _arg.startswith('--'):
        config_given |= _config_file(_arg)
        continue
    if '=' not in _arg and isinstance(globals().get(_arg[2:]), bool):
        _arg += '=True'  # a bare --flag switches a boolean on
    if '=' not in _arg:
        _config_error(f'override {_arg!r} has no value: write it as --key=value')
    _key, _val = _arg[2:].split('=', 1)
    try:
        _new = _ast.literal_eval(_val)
    except (SyntaxError, ValueError):
        _new = _val  # a bare string such as --dataset=mnist
    _config_set(_key, _new)
    config_given.add(_key)
config_preset = globals()['preset_file']() if 'preset_file' in globals() else ''
if config_preset:  # under what the user set
    _config_file(config_preset, keep=config_given)
if '--help' in _sys.argv[1:] or '-h' in _sys.argv[1:]:
    _print_help()
    _sys.exit(0)
for _key, _rule in globals().get('config_domains', {}).items():  # the domains, once every setting is in
    _val = globals()[_key]
    if not (_val is None and _config_defaults[_key] is None) and not _in_domain(_val, _rule):
        _each = 'each element ' if isinstance(_val, (tuple, list)) else ''
        _config_error(f'--{_key}={_show(_val)}: {_each}must be {_domain_text(_rule)}')
