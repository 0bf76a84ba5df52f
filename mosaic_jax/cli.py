"""mosaic-jax: runs one experiment described by an ml_collections config file.

  mosaic-jax --config=configs/gemma3_270m.py
  mosaic-jax --config=configs/gemma3_270m.py:smoke
  mosaic-jax --config=configs/gemma2b.py --config.model.path=/data/gemma-2-2b
  mosaic-jax --config=configs/gemma3_270m.py --config.mode=report --config.workdir=runs

`python main.py ...` is the same command. Any config field can be overridden with
--config.FIELD=VALUE. The config file may be given from any directory: the folder holding
its package (configs/) goes on sys.path, so its `from configs import base` resolves.
Bad input prints one `error: ...` line and exits with status 2. Only warnings and errors
are logged; --verbosity=1 adds INFO logs and the traceback of an error, 2 adds DEBUG.
"""
import logging as py_logging
import os
import re
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
from ml_collections.config_flags import config_path

EXIT_BAD_INPUT = 2
_PREFIX = '--config.'
# Python loggers of libraries that log through their own logger, not absl's.
_QUIET_LOGGERS = ('absl', 'jax', 'orbax')

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file (configs/*.py), optionally FILE:ARG (e.g. :smoke).',
    lock_config=True)


class _BadInput(Exception):
    """Bad command-line input: printed as one `error:` line, exit status 2."""


def _one_line(text) -> str:
    """`text` on one line; an embedded traceback is cut down to its last line."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    cut = next((i for i, ln in enumerate(lines) if ln.startswith('Traceback')), None)
    if cut is not None:
        lines = lines[:cut] + lines[-1:]
    return ' '.join(lines)


def _fail(message, exc=None, verbose=False):
    """Prints `error: message` (after the traceback of `exc` when verbose), exits 2."""
    if verbose and exc is not None:
        traceback.print_exception(exc)
    sys.stderr.write(f'error: {_one_line(message)}\n')
    sys.stderr.flush()
    sys.exit(EXIT_BAD_INPUT)


def _prescan(argv) -> tuple[str | None, int]:
    """The config argument and --verbosity, read before the real parse (which may fail)."""
    fv = flags.FlagValues()
    flags.DEFINE_string('config', None, '', flag_values=fv)
    flags.DEFINE_integer('verbosity', 0, '', short_name='v', flag_values=fv)
    try:
        fv(list(argv), known_only=True)
    except flags.Error:
        return None, 0
    return fv.config, fv.verbosity


def _config_file(argument: str) -> str:
    return argument.split(':', 1)[0]  # ml_collections passes what follows ':' to get_config


def _add_config_root(path: str) -> None:
    """Puts the folder holding the config's package first on sys.path (from any cwd)."""
    folder = os.path.dirname(os.path.abspath(path))
    root = os.path.dirname(folder)
    if os.path.isfile(os.path.join(folder, '__init__.py')) and root not in sys.path:
        sys.path.insert(0, root)


def _load_unchecked(argument: str, argv0: str):
    """The config file's config without any --config.FIELD override applied."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file('config', None, '', flag_values=fv, lock_config=False,
                                    sys_argv=[argv0])
    fv([argv0, f'--config={argument}'])
    return fv.config


def _override_error(argument: str, argv) -> str | None:
    """Names the first --config.FIELD override that does not exist in the config file."""
    config = _load_unchecked(argument, argv[0])
    for arg in argv[1:]:
        if not arg.startswith(_PREFIX):
            continue
        field = arg[len(_PREFIX):].split('=', 1)[0]
        try:
            config_path.get_type(field, config)
        except (AttributeError, KeyError, IndexError, TypeError) as e:
            hint = re.search(r'Did you mean .*?\?', str(e))
            return (f'unknown config field {field!r} in {arg}'
                    + (f' ({hint.group(0)})' if hint else ''))
    return None


def _parse_error(e: Exception, argument, argv) -> str:
    """One line for a failed flag parse: the missing file, the bad field or the error."""
    path = _config_file(argument) if argument else None
    if path and not os.path.isfile(path):
        where = '' if os.path.isabs(path) else f' (relative to {os.getcwd()})'
        what = 'is a directory' if os.path.isdir(path) else 'not found'
        return f'config file {what}: {path}{where}'
    if isinstance(e, flags.Error):  # e.g. "flag --config.seed=abc: invalid literal ..."
        return str(e)
    if isinstance(e, OSError) and path:  # ml_collections' load failure: its last line says why
        return f'config file {path}: {str(e).strip().splitlines()[-1].strip()}'
    try:
        message = _override_error(argument, argv) if argument else None
    except Exception as load_error:  # pylint: disable=broad-except
        return f'config file {path}: {type(load_error).__name__}: {load_error}'
    return message or f'{type(e).__name__}: {e}'


def _check_loaded(argument) -> None:
    """ml_collections defers a failed load (OSError) until the config is read: read it."""
    if not argument:
        raise _BadInput('--config is required, e.g. --config=configs/gemma3_270m.py')
    config = _CONFIG.value
    if not hasattr(config, 'keys'):  # _ErrorConfig raises its OSError here
        raise _BadInput(f'config file {argument}: get_config() returned '
                        f'{type(config).__name__}, not a ConfigDict')


def _quiet_logging() -> None:
    """Warnings and errors only unless --verbosity >= 1 (1: INFO, 2: DEBUG, 3+: vlog)."""
    v = flags.FLAGS.verbosity
    if v <= -2:
        level = logging.converter.absl_to_standard(v)
    elif v <= 0:
        level = py_logging.WARNING
    else:
        level = logging.converter.absl_to_standard(min(v - 1, 1)) - max(v - 2, 0)
    py_logging.root.setLevel(level)  # absl's handler sits on the root logger
    chosen = flags.FLAGS.logger_levels or {}
    for name in _QUIET_LOGGERS:
        if name not in chosen:
            py_logging.getLogger(name).setLevel(level)


def _parse_flags(argv):
    """absl flags parser: bad flags and config files become one `error:` line."""
    argument, verbosity = _prescan(argv)
    if argument:
        _add_config_root(_config_file(argument))
    try:
        rest = flags.FLAGS(argv)
        _check_loaded(argument)
    except _BadInput as e:
        _fail(e)
    except BrokenPipeError:  # `--help | head`: not bad input (run() handles it)
        raise
    except Exception as e:  # pylint: disable=broad-except
        _fail(_parse_error(e, argument, argv), e, verbosity >= 1)
    return rest


def _main(argv):
    _quiet_logging()  # here: absl resets the verbosity after the flags parser returns
    verbose = flags.FLAGS.verbosity >= 1
    if len(argv) > 1:
        _fail(f'unexpected arguments: {" ".join(argv[1:])} (flags are --name=value)')
    from mosaic_jax import checks  # pylint: disable=g-import-not-at-top
    from mosaic_jax.experiments import experiment
    try:
        experiment.run(_CONFIG.value)
    except checks.UserError as e:  # bad input or missing weights
        _fail(e, e, verbose)


def run(argv=None):
    """The `mosaic-jax` console script; `python main.py` calls it as well."""
    main_module = sys.modules.get('__main__')
    if main_module is not None:
        main_module.__doc__ = __doc__  # absl's --help prints __main__'s docstring
    for name in ('config', 'verbosity'):  # listed by --help (the main module's flags)
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
    flags.FLAGS['verbosity'].help = (
        '0 or less (the default): only warnings and errors are logged; 1: also INFO '
        'logs and the traceback of an error; 2: also DEBUG logs.')
    try:
        app.run(_main, argv=argv, flags_parser=_parse_flags)
    except BrokenPipeError:  # stdout closed early (`| head`): no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
