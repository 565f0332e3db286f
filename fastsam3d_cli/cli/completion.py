"""Static shell-completion scripts (bash, zsh, fish) generated from the Typer app.

Static scripts complete instantly (no Python start-up, no torch import on every Tab) and list every
subcommand, option and option value that has a fixed set (--model, --attention, --dtype, --device, weight
names), folders where a folder is expected and files where a file is. They are the one completion story:
Typer's --install-completion is switched off. `completions/` holds the generated files; a test checks they
are current. Regenerate with:  python -m fastsam3d_cli.cli.completion completions/
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import typer

SHELLS = ("bash", "zsh", "fish")
PROG = "fastsam3d"


@dataclass
class OptionSpec:
    names: list[str]  # e.g. ["-o", "--output"]
    help: str
    takes_value: bool
    choices: list[str] = field(default_factory=list)
    is_path: bool = False
    is_dir: bool = False  # complete folders only


@dataclass
class CommandSpec:
    path: list[str]  # e.g. ["weights", "download"]
    help: str
    options: list[OptionSpec]
    positional_paths: bool
    subcommands: list["CommandSpec"] = field(default_factory=list)
    positional_dirs: bool = False  # the positional arguments are folders
    positional_choices: list[str] = field(default_factory=list)  # e.g. weight names


# Placeholders (metavars) that name a folder or a file: how the scripts know what to complete.
DIR_METAVARS = {"DIR", "RUN_DIR", "PREPARED_DIR", "RAW_DATASET_DIR"}
FILE_METAVARS = {"FILE", "PATH", "CKPT", "CHECKPOINT", "PNG", "CSV", "CLICKS_JSON", "MASK", "VOLUME", "JSON_OR_FILE"}


def value_choices(command: list[str], option: str) -> list[str]:
    """The fixed values of an option (or, for option "", of a command's positional argument), from the code
    that checks them, so the scripts stay true when a choice is added."""
    from fastsam3d_cli.model.attention import BACKENDS
    from fastsam3d_cli.model.config import PRESET_NAMES
    from fastsam3d_cli.weights.cache import BUILTIN_REGISTRY
    from fastsam3d_cli.weights.loading import DTYPES, MODEL_CHOICES

    top = command[0] if command else ""
    if option == "":
        return sorted(BUILTIN_REGISTRY) if top == "weights" else []
    if option == "--model":
        if top in ("infer", "serve"):
            from fastsam3d_cli.weights.bundled import ALIAS

            return list(MODEL_CHOICES) + [ALIAS]
        return list(PRESET_NAMES)
    if option == "--student":
        return list(PRESET_NAMES)
    if option == "--teacher-model":
        return list(PRESET_NAMES) + ["auto"]
    if option == "--attention":
        return list(BACKENDS) if top in ("infer", "benchmark") else [b for b in BACKENDS if b != "sparse"]
    if option == "--dtype":
        return list(DTYPES)
    if option == "--cache-dtype":
        from fastsam3d_cli.training.feature_cache import CACHE_DTYPES

        return list(CACHE_DTYPES)
    if option == "--device":
        return ["auto", "cpu", "cuda"]
    if option == "--format" and top == "infer":
        from fastsam3d_cli.interactive.export import FORMATS

        return list(FORMATS)
    if option == "--prior":
        from fastsam3d_cli.interactive.prior import PRIOR_KINDS

        return list(PRIOR_KINDS)
    if option == "--mesh-format":
        from fastsam3d_cli.interactive.export import MESH_FORMATS

        return list(MESH_FORMATS)
    return []


def _first_line(text: str | None) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line.replace("[", "").replace("]", "").rstrip(".")


def _value_kind(param) -> tuple[list[str], bool]:
    """(choices, is_path) of a parameter, from Typer's type descriptor or a plain click type."""
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is not None:
        choices = [str(getattr(c, "value", c)) for c in (descriptor.choices or [])] if descriptor.is_choice else []
        return choices, bool(descriptor.is_path or descriptor.is_file)
    param_type = getattr(param, "type", None)
    return [str(c) for c in getattr(param_type, "choices", None) or []], type(param_type).__name__ in ("Path", "File")


def _spec(command, path: list[str]) -> CommandSpec:
    """Introspect a (Typer-vendored) click command; duck-typed so it works with either click flavour."""
    options, positional_paths, positional_dirs = [], False, False
    for param in command.params:
        metavar = str(getattr(param, "metavar", None) or "").strip("[]")
        if param.param_type_name == "option":
            if getattr(param, "hidden", False) or param.name in ("install_completion", "show_completion"):
                continue
            choices, is_path = _value_kind(param)
            names = list(param.opts) + list(param.secondary_opts)
            long_name = next((n for n in names if n.startswith("--")), names[0])
            choices = choices or value_choices(path, long_name)
            takes_value = not getattr(param, "is_flag", False) and not getattr(param, "count", False)
            options.append(OptionSpec(names, _first_line(param.help), takes_value, choices,
                                      is_path or metavar in FILE_METAVARS | DIR_METAVARS, metavar in DIR_METAVARS))
        elif param.param_type_name == "argument":
            if metavar in DIR_METAVARS:
                positional_dirs = True
            elif _value_kind(param)[1] or metavar in FILE_METAVARS:
                positional_paths = True
    subcommands = []
    if hasattr(command, "list_commands"):
        for name in command.list_commands(None):
            sub = command.get_command(None, name)
            if sub is not None and not getattr(sub, "hidden", False):
                subcommands.append(_spec(sub, path + [name]))
    return CommandSpec(path, _first_line(command.help or command.short_help), options, positional_paths, subcommands,
                       positional_dirs, value_choices(path, "") if path[:1] == ["weights"] and len(path) > 1 else [])


def command_tree(app: typer.Typer | None = None) -> CommandSpec:
    """The app's commands and options as plain data."""
    if app is None:
        from fastsam3d_cli.cli import app as default_app
        app = default_app
    return _spec(typer.main.get_command(app), [])


def _walk(spec: CommandSpec):
    yield spec
    for sub in spec.subcommands:
        yield from _walk(sub)


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "'\\''")


# ------------------------------------------------------------------------------------------------ bash
def bash_script(tree: CommandSpec) -> str:
    lines = [f"# bash completion for {PROG} — generated from the Typer app; do not edit by hand.",
             f"# Install: source this file, or copy it to ~/.local/share/bash-completion/completions/{PROG}",
             f"_{PROG}_children() {{",
             '    case "$1" in']
    for spec in _walk(tree):
        if spec.subcommands:
            lines.append(f'        "{" ".join(spec.path)}") echo "{" ".join(s.path[-1] for s in spec.subcommands)}" ;;')
    lines += ['    esac',
              '}',
              f"_{PROG}_completion() {{",
              '    local cur prev path i word child',
              '    cur="${COMP_WORDS[COMP_CWORD]}"; prev="${COMP_WORDS[COMP_CWORD-1]}"; path=""',
              '    for ((i = 1; i < COMP_CWORD; i++)); do',
              '        word="${COMP_WORDS[i]}"',
              f'        for child in $(_{PROG}_children "$path"); do',
              '            if [[ "$word" == "$child" ]]; then path="${path:+$path }$word"; break; fi',
              '        done',
              '    done',
              '    case "$path" in']
    for spec in _walk(tree):
        lines.append(f'        "{" ".join(spec.path)}")')
        lines.append('            case "$prev" in')
        for option in spec.options:
            if option.takes_value:
                joined = "|".join(option.names)
                if option.choices:
                    lines.append(f'                {joined}) COMPREPLY=($(compgen -W "{" ".join(option.choices)}" -- "$cur")); return ;;')
                elif option.is_dir:
                    lines.append(f'                {joined}) COMPREPLY=($(compgen -d -- "$cur")); return ;;')
                elif option.is_path:
                    lines.append(f'                {joined}) COMPREPLY=($(compgen -f -- "$cur")); return ;;')
                else:
                    lines.append(f'                {joined}) return ;;')
        lines.append('            esac')
        opts = " ".join(n for o in spec.options for n in o.names)
        lines.append(f'            if [[ "$cur" == -* ]]; then COMPREPLY=($(compgen -W "{opts}" -- "$cur"))')
        if spec.subcommands:
            lines.append(f'            else COMPREPLY=($(compgen -W "{" ".join(s.path[-1] for s in spec.subcommands)}" -- "$cur")); fi ;;')
        elif spec.positional_choices:
            files = ' $(compgen -f -- "$cur")' if spec.positional_paths else ""
            lines.append(f'            else COMPREPLY=($(compgen -W "{" ".join(spec.positional_choices)}" -- "$cur"){files}); fi ;;')
        elif spec.positional_dirs:
            lines.append('            else COMPREPLY=($(compgen -d -- "$cur")); fi ;;')
        else:
            lines.append('            else COMPREPLY=($(compgen -f -- "$cur")); fi ;;')
    lines += ['    esac',
              '}',
              f"complete -o filenames -F _{PROG}_completion {PROG}", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- zsh
def zsh_script(tree: CommandSpec) -> str:
    def func_name(spec: CommandSpec) -> str:
        return "_" + "_".join([PROG] + [p.replace("-", "_") for p in spec.path])

    lines = [f"#compdef {PROG}",
             f"# zsh completion for {PROG} — generated from the Typer app; do not edit by hand.",
             f"# Install: put this file, named _{PROG}, in a folder on your $fpath, then run compinit.", ""]
    for spec in _walk(tree):
        lines.append(f"{func_name(spec)}() {{")
        args = []
        for option in spec.options:
            action = ""
            if option.takes_value:
                if option.choices:
                    action = f":value:({' '.join(option.choices)})"
                elif option.is_dir:
                    action = ":folder:_files -/"
                elif option.is_path:
                    action = ":file:_files"
                else:
                    action = ":value: "
            description = _quote(option.help).replace(":", "\\:")
            if len(option.names) > 1:
                group = " ".join(option.names)
                args.append(f"'({group})'{{{','.join(option.names)}}}'[{description}]{action}'")
            else:
                args.append(f"'{option.names[0]}[{description}]{action}'")
        if spec.subcommands:
            args += ["'1: :->command'", "'*:: :->args'"]
        elif spec.positional_choices:
            args.append(f"'1:name:({' '.join(spec.positional_choices)})'")
            if spec.positional_paths:
                args.append("'*:file:_files'")
        elif spec.positional_dirs:
            args.append("'*:folder:_files -/'")
        elif spec.positional_paths:
            args.append("'*:file:_files'")
        lines.append("    local state line")
        lines.append("    _arguments -C \\")
        lines.extend(f"        {arg} \\" for arg in args)
        lines.append("        && return 0")
        if spec.subcommands:
            lines.append("    case $state in")
            lines.append("        command)")
            lines.append("            local -a commands=(")
            for sub in spec.subcommands:
                lines.append(f"                '{sub.path[-1]}:{_quote(sub.help).replace(':', chr(92) + ':')}'")
            lines.append("            )")
            lines.append("            _describe 'command' commands ;;")
            lines.append("        args)")
            lines.append("            case $line[1] in")
            for sub in spec.subcommands:
                lines.append(f"                {sub.path[-1]}) {func_name(sub)} ;;")
            lines.append("            esac ;;")
            lines.append("    esac")
        lines.append("}")
        lines.append("")
    lines.append(f'{func_name(tree)} "$@"')
    lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ fish
def fish_script(tree: CommandSpec) -> str:
    lines = [f"# fish completion for {PROG} — generated from the Typer app; do not edit by hand.",
             f"# Install: copy to ~/.config/fish/completions/{PROG}.fish", "",
             f"complete -c {PROG} -f"]
    for spec in _walk(tree):
        if not spec.path:
            condition = "__fish_use_subcommand"
        elif len(spec.path) == 1:
            siblings = " ".join(s.path[-1] for s in spec.subcommands)
            condition = f"__fish_seen_subcommand_from {spec.path[0]}"
            if siblings:
                condition += f"; and not __fish_seen_subcommand_from {siblings}"
        else:
            condition = f"__fish_seen_subcommand_from {spec.path[-2]}; and __fish_seen_subcommand_from {spec.path[-1]}"
        for sub in spec.subcommands:
            parent = "__fish_use_subcommand" if not spec.path else condition
            lines.append(f"complete -c {PROG} -n '{parent}' -a {sub.path[-1]} -d '{_quote(sub.help)}'")
        for option in spec.options:
            flags = []
            for name in option.names:
                flags.append(f"-l {name[2:]}" if name.startswith("--") else f"-s {name[1:]}")
            extra = ""
            if option.takes_value:
                extra = " -r"
                if option.choices:
                    extra += f" -a '{' '.join(option.choices)}'"
                elif option.is_dir:
                    extra += " -a '(__fish_complete_directories)'"
                elif option.is_path:
                    extra += " -F"
            lines.append(f"complete -c {PROG} -n '{condition}' {' '.join(flags)}{extra} -d '{_quote(option.help)}'")
        if spec.positional_choices and spec.path:
            lines.append(f"complete -c {PROG} -n '{condition}' -a '{' '.join(spec.positional_choices)}'")
        if spec.positional_dirs and spec.path:
            lines.append(f"complete -c {PROG} -n '{condition}' -a '(__fish_complete_directories)'")
        elif spec.positional_paths and spec.path:
            lines.append(f"complete -c {PROG} -n '{condition}' -F")
    lines.append("")
    return "\n".join(lines)


GENERATORS = {"bash": bash_script, "zsh": zsh_script, "fish": fish_script}
FILE_NAMES = {"bash": f"{PROG}.bash", "zsh": f"_{PROG}", "fish": f"{PROG}.fish"}


def completion_scripts(app: typer.Typer | None = None) -> dict[str, str]:
    """File name → script text for every supported shell."""
    tree = command_tree(app)
    return {FILE_NAMES[shell]: GENERATORS[shell](tree) for shell in SHELLS}


def main(argv: list[str] | None = None) -> None:
    """Write the scripts into the folder given as the only argument (default: completions/)."""
    args = sys.argv[1:] if argv is None else argv
    folder = Path(args[0] if args else "completions")
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in completion_scripts().items():
        (folder / name).write_text(text, encoding="utf-8")
        print(folder / name)


if __name__ == "__main__":
    main()
