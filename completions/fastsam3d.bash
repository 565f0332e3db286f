# bash completion for fastsam3d — generated from the Typer app; do not edit by hand.
# Install: source this file, or copy it to ~/.local/share/bash-completion/completions/fastsam3d
_fastsam3d_children() {
    case "$1" in
        "") echo "infer serve prepare train distill validate benchmark weights" ;;
        "weights") echo "list download verify path import remove bundle" ;;
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
            else COMPREPLY=($(compgen -W "infer serve prepare train distill validate benchmark weights" -- "$cur")); fi ;;
        "infer")
            case "$prev" in
                --clicks|-c) COMPREPLY=($(compgen -f -- "$cur")); return ;;
                --output|-o) COMPREPLY=($(compgen -f -- "$cur")); return ;;
                --model|-m) COMPREPLY=($(compgen -W "fastsam3d sam-med3d sam-med3d-turbo fastsam3d-tiny bundled" -- "$cur")); return ;;
                --checkpoint) COMPREPLY=($(compgen -f -- "$cur")); return ;;
                --device) COMPREPLY=($(compgen -W "auto cpu cuda" -- "$cur")); return ;;
                --attention) COMPREPLY=($(compgen -W "auto exact sdpa flash sparse" -- "$cur")); return ;;
                --dtype) COMPREPLY=($(compgen -W "float32 bfloat16 float16" -- "$cur")); return ;;
                --max-crops) return ;;
                --channel) return ;;
                --preview) COMPREPLY=($(compgen -f -- "$cur")); return ;;
                --probabilities) COMPREPLY=($(compgen -d -- "$cur")); return ;;
                --batch) COMPREPLY=($(compgen -f -- "$cur")); return ;;
                --series) return ;;
                --format) COMPREPLY=($(compgen -W "labelmap dicom-seg" -- "$cur")); return ;;
                --mesh) COMPREPLY=($(compgen -d -- "$cur")); return ;;
                --mesh-format) COMPREPLY=($(compgen -W "stl obj" -- "$cur")); return ;;
            esac
            if [[ "$cur" == -* ]]; then COMPREPLY=($(compgen -W "--clicks -c --output -o --model -m --checkpoint --device --attention --dtype --max-crops --channel --offline --preview --probabilities --overwrite --json --batch --series --format --mesh --mesh-format" -- "$cur"))
            else COMPREPLY=($(compgen -f -- "$cur")); fi ;;
        "serve")
            case "$prev" in
                --host) return ;;
                --port) return ;;
                --root) COMPREPLY=($(compgen -d -- "$cur")); return ;;
                --token) return ;;
                --model|-m) COMPREPLY=($(compgen -W "fastsam3d sam-med3d sam-med3d-turbo fastsam3d-tiny bundled" -- "$cur")); return ;;
                --checkpoint) COMPREPLY=($(compgen -f -- "$cur")); return ;;
                --device) COMPREPLY=($(compgen -W "auto cpu cuda" -- "$cur")); return ;;
                --attention) COMPREPLY=($(compgen -W "auto exact sdpa flash" -- "$cur")); return ;;
                --dtype) COMPREPLY=($(compgen -W "float32 bfloat16 float16" -- "$cur")); return ;;
                --max-crops) return ;;
                --max-sessions) return ;;
                --max-memory) return ;;
                --max-upload) return ;;
            esac
            if [[ "$cur" == -* ]]; then COMPREPLY=($(compgen -W "--host --port --root --token --model -m --checkpoint --device --attention --dtype --max-crops --offline --max-sessions --max-memory --max-upload" -- "$cur"))
            else COMPREPLY=($(compgen -f -- "$cur")); fi ;;
        "prepare")
            case "$prev" in
                --output|-o) COMPREPLY=($(compgen -d -- "$cur")); return ;;
                --spacing) return ;;
                --min-volume-mm3) return ;;
                --classes) return ;;
                --channel) return ;;
                --workers) return ;;
                --shard) return ;;
            esac
            if [[ "$cur" == -* ]]; then COMPREPLY=($(compgen -W "--output -o --spacing --min-volume-mm3 --classes --channel --workers --shard --resample-labels --shared-grid --json" -- "$cur"))
            else COMPREPLY=($(compgen -d -- "$cur")); fi ;;
        "train")
            case "$prev" in
                --model|-m) COMPREPLY=($(compgen -W "sam-med3d fastsam3d fastsam3d-tiny fastsam3d-tiny-refine" -- "$cur")); return ;;
                --init) COMPREPLY=($(compgen -f -- "$cur")); return ;;
                --unfreeze-patience) return ;;
                --epochs) return ;;
                --batch-size) return ;;
                --accumulate) return ;;
                --lr) return ;;
                --weight-decay) return ;;
                --lr-milestones) return ;;
                --iterations) return ;;
                --grad-iterations) return ;;
                --centre-clicks) return ;;
                --decoder-lr-scale) return ;;
                --prior) COMPREPLY=($(compgen -W "none classical" -- "$cur")); return ;;
                --prior-scale) return ;;
                --prior-loss) return ;;
                --seed) return ;;
                --output|-o) COMPREPLY=($(compgen -d -- "$cur")); return ;;
                --device) COMPREPLY=($(compgen -W "auto cpu cuda" -- "$cur")); return ;;
                --workers) return ;;
                --attention) COMPREPLY=($(compgen -W "auto exact sdpa flash" -- "$cur")); return ;;
                --max-steps) return ;;
                --time-limit) return ;;
                --save-every) return ;;
                --classes) return ;;
                --min-foreground) return ;;
                --data-mix) return ;;
                --label-maps) COMPREPLY=($(compgen -d -- "$cur")); return ;;
                --samples-per-epoch) return ;;
            esac
            if [[ "$cur" == -* ]]; then COMPREPLY=($(compgen -W "--model -m --init --freeze-encoder --unfreeze-patience --epochs --batch-size --accumulate --lr --weight-decay --lr-milestones --iterations --grad-iterations --centre-clicks --decoder-lr-scale --prior --prior-scale --prior-loss --refine-head --seed --output -o --resume --device --amp --workers --attention --max-steps --time-limit --save-every --classes --min-foreground --data-mix --label-maps --samples-per-epoch --json" -- "$cur"))
            else COMPREPLY=($(compgen -d -- "$cur")); fi ;;
        "distill")
            case "$prev" in
                --teacher) COMPREPLY=($(compgen -f -- "$cur")); return ;;
                --teacher-model) COMPREPLY=($(compgen -W "sam-med3d fastsam3d fastsam3d-tiny fastsam3d-tiny-refine auto" -- "$cur")); return ;;
                --student|-s) COMPREPLY=($(compgen -W "sam-med3d fastsam3d fastsam3d-tiny fastsam3d-tiny-refine" -- "$cur")); return ;;
                --student-init) COMPREPLY=($(compgen -f -- "$cur")); return ;;
                --cache-features) COMPREPLY=($(compgen -d -- "$cur")); return ;;
                --cache-dtype) COMPREPLY=($(compgen -W "float16 float32" -- "$cur")); return ;;
                --epochs-per-stage) return ;;
                --lr) return ;;
                --batch-size) return ;;
                --accumulate) return ;;
                --seed) return ;;
                --output|-o) COMPREPLY=($(compgen -d -- "$cur")); return ;;
                --device) COMPREPLY=($(compgen -W "auto cpu cuda" -- "$cur")); return ;;
                --workers) return ;;
                --attention) COMPREPLY=($(compgen -W "auto exact sdpa flash" -- "$cur")); return ;;
                --max-steps) return ;;
                --time-limit) return ;;
                --save-every) return ;;
                --classes) return ;;
                --max-samples) return ;;
            esac
            if [[ "$cur" == -* ]]; then COMPREPLY=($(compgen -W "--teacher --teacher-model --student -s --student-init --cache-features --cache-dtype --epochs-per-stage --init-from-teacher --no-init-from-teacher --freeze-copied --lr --batch-size --accumulate --seed --output -o --resume --device --amp --workers --attention --max-steps --time-limit --save-every --classes --max-samples --json" -- "$cur"))
            else COMPREPLY=($(compgen -d -- "$cur")); fi ;;
        "validate")
            case "$prev" in
                --checkpoint) COMPREPLY=($(compgen -f -- "$cur")); return ;;
                --model|-m) COMPREPLY=($(compgen -W "sam-med3d fastsam3d fastsam3d-tiny fastsam3d-tiny-refine" -- "$cur")); return ;;
                --clicks) return ;;
                --seed) return ;;
                --classes) return ;;
                --device) COMPREPLY=($(compgen -W "auto cpu cuda" -- "$cur")); return ;;
                --attention) COMPREPLY=($(compgen -W "auto exact sdpa flash" -- "$cur")); return ;;
                --plot) COMPREPLY=($(compgen -f -- "$cur")); return ;;
                --csv) COMPREPLY=($(compgen -f -- "$cur")); return ;;
            esac
            if [[ "$cur" == -* ]]; then COMPREPLY=($(compgen -W "--checkpoint --model -m --clicks --seed --classes --device --attention --plot --csv --overwrite --json" -- "$cur"))
            else COMPREPLY=($(compgen -d -- "$cur")); fi ;;
        "benchmark")
            case "$prev" in
                --model|-m) COMPREPLY=($(compgen -W "sam-med3d fastsam3d fastsam3d-tiny fastsam3d-tiny-refine" -- "$cur")); return ;;
                --checkpoint) COMPREPLY=($(compgen -f -- "$cur")); return ;;
                --attention|-a) COMPREPLY=($(compgen -W "auto exact sdpa flash sparse" -- "$cur")); return ;;
                --device) COMPREPLY=($(compgen -W "auto cpu cuda" -- "$cur")); return ;;
                --dtype) COMPREPLY=($(compgen -W "float32 bfloat16 float16" -- "$cur")); return ;;
                --batch) return ;;
                --repeats) return ;;
                --warmup) return ;;
                --clicks) return ;;
                --volume) COMPREPLY=($(compgen -f -- "$cur")); return ;;
                --series) return ;;
                --clicks-file) COMPREPLY=($(compgen -f -- "$cur")); return ;;
                --budget) return ;;
                --threads) return ;;
            esac
            if [[ "$cur" == -* ]]; then COMPREPLY=($(compgen -W "--model -m --checkpoint --attention -a --device --dtype --batch --repeats --warmup --clicks --volume --series --clicks-file --json --budget --threads --no-flops" -- "$cur"))
            else COMPREPLY=($(compgen -f -- "$cur")); fi ;;
        "weights")
            case "$prev" in
            esac
            if [[ "$cur" == -* ]]; then COMPREPLY=($(compgen -W "" -- "$cur"))
            else COMPREPLY=($(compgen -W "list download verify path import remove bundle" -- "$cur")); fi ;;
        "weights list")
            case "$prev" in
            esac
            if [[ "$cur" == -* ]]; then COMPREPLY=($(compgen -W "--json" -- "$cur"))
            else COMPREPLY=($(compgen -W "fastsam3d sam-med3d-turbo" -- "$cur")); fi ;;
        "weights download")
            case "$prev" in
            esac
            if [[ "$cur" == -* ]]; then COMPREPLY=($(compgen -W "--offline --json" -- "$cur"))
            else COMPREPLY=($(compgen -W "fastsam3d sam-med3d-turbo" -- "$cur")); fi ;;
        "weights verify")
            case "$prev" in
            esac
            if [[ "$cur" == -* ]]; then COMPREPLY=($(compgen -W "--json" -- "$cur"))
            else COMPREPLY=($(compgen -W "fastsam3d sam-med3d-turbo" -- "$cur")); fi ;;
        "weights path")
            case "$prev" in
            esac
            if [[ "$cur" == -* ]]; then COMPREPLY=($(compgen -W "--json" -- "$cur"))
            else COMPREPLY=($(compgen -W "fastsam3d sam-med3d-turbo" -- "$cur")); fi ;;
        "weights import")
            case "$prev" in
            esac
            if [[ "$cur" == -* ]]; then COMPREPLY=($(compgen -W "--replace --json" -- "$cur"))
            else COMPREPLY=($(compgen -W "fastsam3d sam-med3d-turbo" -- "$cur") $(compgen -f -- "$cur")); fi ;;
        "weights remove")
            case "$prev" in
            esac
            if [[ "$cur" == -* ]]; then COMPREPLY=($(compgen -W "--json" -- "$cur"))
            else COMPREPLY=($(compgen -W "fastsam3d sam-med3d-turbo" -- "$cur")); fi ;;
        "weights bundle")
            case "$prev" in
                --name) return ;;
                --output-dir) COMPREPLY=($(compgen -d -- "$cur")); return ;;
                --command) return ;;
                --cpu-hours) return ;;
                --notes) return ;;
                --provenance) COMPREPLY=($(compgen -f -- "$cur")); return ;;
            esac
            if [[ "$cur" == -* ]]; then COMPREPLY=($(compgen -W "--name --output-dir --command --cpu-hours --notes --provenance --overwrite --json" -- "$cur"))
            else COMPREPLY=($(compgen -W "fastsam3d sam-med3d-turbo" -- "$cur") $(compgen -f -- "$cur")); fi ;;
    esac
}
complete -o filenames -F _fastsam3d_completion fastsam3d
