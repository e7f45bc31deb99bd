"""ServerArgumentParser: argparse with vLLM's command-line conventions (vLLM's FlexibleArgumentParser).

- `--config FILE.yaml`: a YAML mapping of flags, keys the long flag names without `--` (`max-model-len: 4096`;
  `max_model_len` is read the same). Command-line flags override the file, the file overrides the defaults. A true
  value of a switch turns it on, false turns it off (`enable-prefix-caching: false` is `--no-enable-prefix-caching`);
  a list fills a flag that takes several values (`served-model-name: [a, b]`) or is joined with commas.
- A positional model (`qwenjax serve Qwen/Qwen2-7B-Instruct`, vLLM's `model_tag`) sets `--model`, and wins over a
  `--model` from the command line or the config file, as in vLLM.
- A flag whose value is a JSON object (`--hf-overrides '{"rope_scaling": {...}}'`, type `json_object`) takes a
  mapping in the file too (`hf-overrides: {rope_scaling: {type: yarn, factor: 4.0}}`).
- On/off flags are BooleanOptionalAction (`--enable-prefix-caching` / `--no-enable-prefix-caching`); the form this
  server took first, `--enable-prefix-caching false` (or `=false`), still parses.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class ServerArgumentParser(argparse.ArgumentParser):
    _reading: str | None = None  # the --config file whose flags are being parsed, named in their errors

    def error(self, message):
        super().error(f"--config {self._reading}: {message}" if self._reading else message)

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(self._spelled_out_switches(args), namespace)

    def parse_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        ns = super().parse_args(args, namespace)  # validates the command line (and answers --help) first
        if getattr(ns, "config", None):
            # Defaults, then the file's values, then the command line's: argparse sets a default only where the
            # namespace it is given lacks the attribute, so the second parse keeps what the file set.
            file_args = self.config_file_args(ns.config)
            self._reading = ns.config
            try:
                from_file = super().parse_args(file_args)
            finally:
                self._reading = None
            ns = super().parse_args(args, namespace=from_file)
        if getattr(ns, "model_tag", None) is not None:
            ns.model = ns.model_tag
        return ns

    def _switch(self, flag: str) -> argparse.Action | None:
        action = self._option_string_actions.get(flag)
        return action if isinstance(action, argparse.BooleanOptionalAction) else None

    def _spelled_out_switches(self, args: list[str]) -> list[str]:
        """`--switch false` / `--switch=true` -> `--no-switch` / `--switch`."""
        out, i = [], 0
        while i < len(args):
            arg = args[i]
            flag, eq, value = arg.partition("=")
            if flag.startswith("--") and not flag.startswith("--no-") and self._switch(flag) is not None:
                if not eq and i + 1 < len(args) and args[i + 1].lower() in _TRUE + _FALSE:
                    value, i = args[i + 1], i + 1
                elif not eq:
                    value = "true"
                if value.lower() not in _TRUE + _FALSE:
                    self.error(f"argument {flag}: expected true or false, got {value!r}")
                arg = flag if value.lower() in _TRUE else "--no-" + flag[2:]
            out.append(arg)
            i += 1
        return out

    def config_file_args(self, path: str) -> list[str]:
        """The command-line flags a `--config` YAML file stands for."""
        import yaml  # only --config needs it

        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            self.error(f"--config {path}: cannot read it ({e.strerror or e})")
        except yaml.YAMLError as e:
            self.error(f"--config {path}: not valid YAML: {e}")
        if data is None:
            return []
        if not isinstance(data, dict):
            self.error(f"--config {path}: expected a mapping of flag names to values (like `port: 8000`), got a "
                       f"{type(data).__name__}")
        args: list[str] = []
        for key, value in data.items():
            flag = "--" + str(key).lstrip("-").replace("_", "-")
            action = self._option_string_actions.get(flag)
            if action is None or flag == "--config" or action.dest == "help":
                self.error(f"--config {path}: {key!r} is not a flag of {self.prog} (keys are the long flag names "
                           f"without '--', e.g. max-model-len)")
            if value is None:
                continue
            if isinstance(value, dict) and action.type is json_object:
                args.append(f"{flag}={json.dumps(value)}")
                continue
            if isinstance(value, dict):
                self.error(f"--config {path}: {key!r} must be a value or a list, got a mapping")
            if action.nargs == 0:  # a switch: store_true or BooleanOptionalAction
                if not isinstance(value, bool):
                    self.error(f"--config {path}: {key!r} is a switch: give it true or false, got {value!r}")
                if value:
                    args.append(flag)
                elif self._switch(flag) is not None:
                    args.append("--no-" + flag[2:])
                elif action.default:
                    self.error(f"--config {path}: {key!r} cannot be turned off")
            elif action.nargs in ("+", "*"):
                args += [flag] + [_text(v) for v in (value if isinstance(value, list) else [value])]
            else:
                args.append(f"{flag}={','.join(map(_text, value)) if isinstance(value, list) else _text(value)}")
        return args


def json_object(text: str) -> dict:
    """argparse type of a flag taking a JSON object (vLLM's --hf-overrides)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"key\": 1}}', got {text!r} ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"key\": 1}}', got {text!r}")
    return value


def _text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
