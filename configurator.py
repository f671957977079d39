"""
nanoGPT-style configuration, exec'd by every script after its globals:

    python train_dit.py config/dit_mnist.py --batch_size=64 --compile=True
    python sample.py --steps=50 --cfg=2.0 --gif

A positional argument is a config file run in the script's globals; --key=value overrides a
global, the value parsed as a Python literal when it is one (else kept as a string); a bare --flag
sets a boolean global to True. Unknown
keys and values of the wrong type stop the script with one line on stderr and exit code 2.
"""
import ast as _ast
import difflib as _difflib
import os as _os
import sys as _sys


def _config_error(msg):
    print(f'error: {msg}', file=_sys.stderr)
    _sys.exit(2)


_config_keys = [k for k, v in globals().items()
                if not k.startswith('_') and isinstance(v, (bool, int, float, str, tuple, list, type(None)))]
for _arg in _sys.argv[1:]:
    if not _arg.startswith('--'):
        if not _os.path.isfile(_arg):
            _config_error(f'config file {_arg!r} not found (presets are in config/, overrides are written --key=value)')
        exec(open(_arg).read())
        continue
    if '=' not in _arg and isinstance(globals().get(_arg[2:]), bool):
        _arg += '=True'  # a bare --flag switches a boolean on
    if '=' not in _arg:
        _config_error(f'override {_arg!r} has no value: write it as --key=value')
    _key, _val = _arg[2:].split('=', 1)
    if _key not in _config_keys:
        _close = _difflib.get_close_matches(_key, _config_keys, n=3, cutoff=0.5)
        _hint = f"; did you mean {', '.join('--' + c for c in _close)}?" if _close else ''
        _config_error(f'unknown config key {_key!r}{_hint} (valid keys: {", ".join(_config_keys)})')
    try:
        _new = _ast.literal_eval(_val)
    except (SyntaxError, ValueError):
        _new = _val  # a bare string such as --dataset=mnist
    _old = globals()[_key]
    if isinstance(_old, float) and type(_new) is int:
        _new = float(_new)
    if isinstance(_old, tuple) and isinstance(_new, list) or isinstance(_old, list) and isinstance(_new, tuple):
        _new = type(_old)(_new)
    if _old is not None and type(_new) is not type(_old):
        _config_error(f'--{_key} expects {type(_old).__name__} (default {_old!r}), got {type(_new).__name__} {_val!r}')
    globals()[_key] = _new
