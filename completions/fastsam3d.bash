# bash completion for fastsam3d — generated from the Typer app; do not edit by hand.
# Install: source this file, or copy it to ~/.local/share/bash-completion/completions/fastsam3d
_fastsam3d_children() {
    case "$1" in
        "") echo "infer prepare benchmark weights" ;;
        "weights") echo "list download verify path import remove" ;;
    esac
}
_fastsam3d_completion() {
    local cur prev path i word child
    cur="${COMP_WORDS[COMP_CWORD]}"; prev="${COMP_WORDS[COMP_CWORD-1]}"; path=""
    for ((i = 1; i < COMP_CWORD; i++)); do
        word="${COMP_WORDS[i]}"
        for child in $(_fastsam3d_children "$path"); do
            if [[ "$word" == "$child" ]]; then path="${path:+$path }$word"; break; fi
        done
    done
    case "$path" in
        "")
            case "$prev" in
            esac
            if [[ "$cur" == -* ]]; then COMPREPLY=($(compgen -W "--version -V --debug --quiet -q" -- "$cur"))
            else COMPREPLY=($(compgen -W "infer prepare benchmark weights" -- "$cur")); fi ;;
        "infer")
            case "$prev" in
                --clicks|-c) COMPREPLY=($(compgen -f -- "$cur")); return ;;
                --output|-o) COMPREPLY=($(compgen -f -- "$cur")); return ;;
                --model|-m) return ;;
                --checkpoint) COMPREPLY=($(compgen -f -- "$cur")); return ;;
                --device) return ;;
                --attention) return ;;
                --max-crops) return ;;
                --channel) return ;;
                --preview) COMPREPLY=($(compgen -f -- "$cur")); return ;;
                --probabilities) COMPREPLY=($(compgen -f -- "$cur")); return ;;
            esac
            if [[ "$cur" == -* ]]; then COMPREPLY=($(compgen -W "--clicks -c --output -o --model -m --checkpoint --device --attention --max-crops --channel --offline --preview --probabilities --overwrite --json" -- "$cur"))
            else COMPREPLY=($(compgen -f -- "$cur")); fi ;;
        "prepare")
            case "$prev" in
                --output|-o) COMPREPLY=($(compgen -f -- "$cur")); return ;;
                --spacing) return ;;
                --min-volume-mm3) return ;;
                --classes) return ;;
                --channel) return ;;
                --workers) return ;;
                --shard) return ;;
            esac
            if [[ "$cur" == -* ]]; then COMPREPLY=($(compgen -W "--output -o --spacing --min-volume-mm3 --classes --channel --workers --shard --resample-labels --json" -- "$cur"))
            else COMPREPLY=($(compgen -f -- "$cur")); fi ;;
        "benchmark")
            case "$prev" in
                --model|-m) return ;;
                --attention|-a) return ;;
                --device) return ;;
                --dtype) return ;;
                --batch) return ;;
                --repeats) return ;;
                --warmup) return ;;
                --clicks) return ;;
                --volume) return ;;
                --clicks-file) return ;;
                --budget) return ;;
                --threads) return ;;
            esac
            if [[ "$cur" == -* ]]; then COMPREPLY=($(compgen -W "--model -m --attention -a --device --dtype --batch --repeats --warmup --clicks --volume --clicks-file --json --budget --threads --no-flops" -- "$cur"))
            else COMPREPLY=($(compgen -f -- "$cur")); fi ;;
        "weights")
            case "$prev" in
            esac
            if [[ "$cur" == -* ]]; then COMPREPLY=($(compgen -W "" -- "$cur"))
            else COMPREPLY=($(compgen -W "list download verify path import remove" -- "$cur")); fi ;;
        "weights list")
            case "$prev" in
            esac
            if [[ "$cur" == -* ]]; then COMPREPLY=($(compgen -W "--json" -- "$cur"))
            else COMPREPLY=($(compgen -f -- "$cur")); fi ;;
        "weights download")
            case "$prev" in
            esac
            if [[ "$cur" == -* ]]; then COMPREPLY=($(compgen -W "--offline --json" -- "$cur"))
            else COMPREPLY=($(compgen -f -- "$cur")); fi ;;
        "weights verify")
            case "$prev" in
            esac
            if [[ "$cur" == -* ]]; then COMPREPLY=($(compgen -W "--json" -- "$cur"))
            else COMPREPLY=($(compgen -f -- "$cur")); fi ;;
        "weights path")
            case "$prev" in
            esac
            if [[ "$cur" == -* ]]; then COMPREPLY=($(compgen -W "--json" -- "$cur"))
            else COMPREPLY=($(compgen -f -- "$cur")); fi ;;
        "weights import")
            case "$prev" in
            esac
            if [[ "$cur" == -* ]]; then COMPREPLY=($(compgen -W "--json" -- "$cur"))
            else COMPREPLY=($(compgen -f -- "$cur")); fi ;;
        "weights remove")
            case "$prev" in
            esac
            if [[ "$cur" == -* ]]; then COMPREPLY=($(compgen -W "--json" -- "$cur"))
            else COMPREPLY=($(compgen -f -- "$cur")); fi ;;
    esac
}
complete -o filenames -F _fastsam3d_completion fastsam3d
