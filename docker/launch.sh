#!/usr/bin/env bash
# Run mixpro-dali in its container: training (one GPU, all GPUs of a node, or several nodes),
# the benchmarks, the bad-file scan, the smoke check or a shell. See docker/README.md.
set -euo pipefail

PROG=launch.sh
DEFAULT_IMAGE=mixpro-dali:0.1.0   # keep the tag equal to pyproject's version (tests check)
IMAGE_UID=1000                    # the image's user, ARG USER_UID in docker/Dockerfile

usage() {
    cat <<'EOF'
Usage: docker/launch.sh [OPTIONS] COMMAND [-- ARGS...]

Commands (ARGS after -- go to the program unchanged):
  train           torchrun -m train [--config C] [--data.train /data/TRAIN --data.val /data/VAL]
                  --output /output ARGS   (needs --output; without --data and --config: the
                  Fashion-MNIST demo; any of these options given in ARGS replaces the launcher's)
  bench-pipeline  python -m tools.bench_pipeline ARGS
  bench-train     torchrun -m tools.bench_train ARGS   (--nproc-per-node defaults to 1)
  scan            python -m pipelines.scan /data ARGS   (needs --data)
  smoke           python -m mixpro_dali.smoke ARGS   (adds --require-gpu unless --gpus none)
  shell           an interactive bash in the container

Options (--opt VALUE or --opt=VALUE):
  --image NAME          image to run (default: $MIXPRO_IMAGE, else mixpro-dali:0.1.0)
  --data DIR            dataset folder, mounted read-only at /data
  --train-dir SUB       training split under --data (default: train)
  --val-dir SUB         validation split under --data (default: val)
  --output DIR          output folder, mounted read-write at /output (created if missing)
  --config CONFIG       train's config: a host YAML file (its folder is mounted read-only at
                        /config), else passed on as is (a packaged preset name)
  --gpus WHICH          all | none | N (a count) | device=I[,J...]   (default: all)
  --nproc-per-node N    processes per node: a number or 'gpu' (default: the GPUs of --gpus)
  --nnodes N            number of nodes (default: 1; 1 uses torchrun --standalone)
  --node-rank R         this node's rank, 0..N-1 (needed when --nnodes > 1)
  --master-addr HOST    address of the rank-0 node (needed when --nnodes > 1)
  --master-port PORT    port on the rank-0 node (default: 29500; only with --nnodes > 1)
  --shm-size SIZE       shared memory for DALI and NCCL, e.g. 16g (default: 16g)
  --user WHO            UID[:GID], or 'image' for the image's own user (default: the host
                        user, so files in --output are yours; 'image' when the host user is root)
  --env KEY=VALUE       set a variable in the container (repeatable); NCCL_* variables of
                        the calling shell are passed on by themselves
  --docker-arg ARG      one more argument for docker run (repeatable),
                        e.g. --docker-arg=--device=/dev/infiniband
  --no-memlock          do not ask for an unlimited locked-memory limit (--ulimit memlock=-1,
                        for pinned memory and RDMA); for daemons that may not raise it
                        (rootless Docker, locked-down hosts: "error setting rlimit type 8")
  --dry-run             print the docker command instead of running it
  -h, --help            this help
EOF
}

die() {
    printf '%s: error: %s\n' "$PROG" "$1" >&2
    printf "Try '%s --help'.\n" "$PROG" >&2
    exit 2
}

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
is_posint() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

# Option values, empty when not given.
image=${MIXPRO_IMAGE:-$DEFAULT_IMAGE} data="" train_dir=train val_dir=val output="" config=""
gpus=all nproc="" nnodes=1 node_rank="" master_addr="" master_port="" shm_size=16g user=""
dry_run=0 memlock=1 command=""
envs=() docker_args=() extra=()

set_option() { # NAME VALUE
    case $1 in
        --image) image=$2 ;;
        --data) data=$2 ;;
        --train-dir) train_dir=$2 ;;
        --val-dir) val_dir=$2 ;;
        --output) output=$2 ;;
        --config) config=$2 ;;
        --gpus) gpus=$2 ;;
        --nproc-per-node) nproc=$2 ;;
        --nnodes) nnodes=$2 ;;
        --node-rank) node_rank=$2 ;;
        --master-addr) master_addr=$2 ;;
        --master-port) master_port=$2 ;;
        --shm-size) shm_size=$2 ;;
        --user) user=$2 ;;
        --env) envs+=("$2") ;;
        --docker-arg) docker_args+=("$2") ;;
        *) die "unknown option $1" ;;
    esac
}

is_valued() { # NAME: true for the options above (all take a value)
    case $1 in
        --image | --data | --train-dir | --val-dir | --output | --config | --gpus) return 0 ;;
        --nproc-per-node | --nnodes | --node-rank | --master-addr | --master-port) return 0 ;;
        --shm-size | --user | --env | --docker-arg) return 0 ;;
        *) return 1 ;;
    esac
}

parse_args() {
    local arg name value
    while (($#)); do
        arg=$1
        case $arg in
            --) shift; extra=("$@"); return ;;
            -h | --help) usage; exit 0 ;;
            --dry-run) dry_run=1; shift; continue ;;
            --no-memlock) memlock=0; shift; continue ;;
            --*=*) name=${arg%%=*}; value=${arg#*=}; shift ;;
            -*)
                name=$arg
                is_valued "$name" || die "unknown option $name"
                if (($# < 2)) || { [[ $2 == --* ]] && [[ $name != --docker-arg ]]; }; then
                    die "$name needs a value"
                fi
                value=$2; shift 2 ;;
            *)
                [[ -z $command ]] || die "unexpected argument '$arg': program arguments go after --"
                command=$arg; shift; continue ;;
        esac
        is_valued "$name" || die "unknown option $name"
        [[ -n $value ]] || die "$name needs a value"
        set_option "$name" "$value"
    done
}

# has_arg NAME: true when the pass-through ARGS already set option NAME (as NAME V or NAME=V).
has_arg() {
    local a
    for a in "${extra[@]+"${extra[@]}"}"; do
        [[ $a == "$1" || $a == "$1="* ]] && return 0
    done
    return 1
}

abs_path() { # PATH -> absolute, without needing it to exist
    if [[ $1 == /* ]]; then printf '%s' "$1"; else printf '%s/%s' "$PWD" "$1"; fi
}

mount_arg() { # SRC DST [readonly]
    [[ $1 != *,* ]] || die "paths with a comma cannot be mounted: '$1'"
    printf 'type=bind,src=%s,dst=%s%s' "$1" "$2" "${3:+,readonly}"
}

parse_args "$@"

case $command in
    train | bench-train) uses_torchrun=1 ;;
    bench-pipeline | scan | smoke | shell) uses_torchrun=0 ;;
    "") die "no command given (train, bench-pipeline, bench-train, scan, smoke, shell)" ;;
    *) die "unknown command '$command' (train, bench-pipeline, bench-train, scan, smoke, shell)" ;;
esac

# --- GPUs -> docker --gpus and the default process count --------------------------------------
gpu_count=""   # known number of GPUs, empty for 'all'
case $gpus in
    all) docker_gpus=(--gpus all) ;;
    none) docker_gpus=(-e NVIDIA_VISIBLE_DEVICES=void); gpu_count=0 ;;
    device=*)
        [[ ${gpus#device=} =~ ^[0-9]+(,[0-9]+)*$ ]] \
            || die "--gpus device= takes GPU indices like device=0,1, got '$gpus'"
        docker_gpus=(--gpus "\"$gpus\"")   # quoted: docker reads the value as CSV
        IFS=, read -ra ids <<<"${gpus#device=}"; gpu_count=${#ids[@]} ;;
    *)
        is_posint "$gpus" || die "--gpus takes all, none, a count or device=I[,J...], got '$gpus'"
        docker_gpus=(--gpus "$gpus"); gpu_count=$gpus ;;
esac

# --- torchrun options ---------------------------------------------------------------------------
is_posint "$nnodes" || die "--nnodes must be a positive integer, got '$nnodes'"
if ((uses_torchrun == 0)); then
    for pair in "--nproc-per-node:$nproc" "--node-rank:$node_rank" "--master-addr:$master_addr" \
        "--master-port:$master_port"; do
        [[ -z ${pair#*:} ]] || die "${pair%%:*} applies to train and bench-train only"
    done
    ((nnodes == 1)) || die "--nnodes applies to train and bench-train only"
fi
if [[ -z $nproc ]]; then
    if [[ $command == bench-train || $gpu_count == 0 ]]; then nproc=1
    elif [[ -z $gpu_count ]]; then nproc=gpu
    else nproc=$gpu_count; fi
elif [[ $nproc == gpu ]]; then
    [[ $gpu_count != 0 ]] || die "--nproc-per-node gpu needs GPUs, but --gpus is none"
else
    is_posint "$nproc" || die "--nproc-per-node must be a positive integer or 'gpu', got '$nproc'"
    if [[ -n $gpu_count && $gpu_count != 0 ]] && ((nproc > gpu_count)); then
        die "--nproc-per-node $nproc is more than the $gpu_count GPU(s) of --gpus $gpus"
    fi
fi
if ((nnodes > 1)); then
    [[ -n $node_rank ]] || die "--node-rank is needed when --nnodes is $nnodes"
    if ! is_uint "$node_rank" || ((node_rank >= nnodes)); then
        die "--node-rank must be in 0..$((nnodes - 1)) for --nnodes $nnodes, got '$node_rank'"
    fi
    [[ -n $master_addr ]] || die "--master-addr is needed when --nnodes is $nnodes"
    master_port=${master_port:-29500}
    if ! is_posint "$master_port" || ((master_port > 65535)); then
        die "--master-port must be in 1..65535, got '$master_port'"
    fi
    rendezvous=(--node-rank "$node_rank" --master-addr "$master_addr" --master-port "$master_port")
else
    for pair in "--node-rank:$node_rank" "--master-addr:$master_addr" "--master-port:$master_port"; do
        [[ -z ${pair#*:} ]] || die "${pair%%:*} needs --nnodes > 1 (one node uses --standalone)"
    done
    rendezvous=(--standalone)
fi

# --- other options --------------------------------------------------------------------------
[[ $shm_size =~ ^[1-9][0-9]*[bkmgBKMG]?$ ]] \
    || die "--shm-size takes a size like 16g or 512m, got '$shm_size'"
[[ -n $image ]] || die "--image needs a value"
if [[ -z $user ]]; then
    host_uid=$(id -u) host_gid=$(id -g)
    if ((host_uid == 0)); then user=image; else user=$host_uid:$host_gid; fi
fi
if [[ $user == image ]]; then
    user_args=()
else
    [[ $user =~ ^[0-9]+(:[0-9]+)?$ ]] || die "--user takes UID[:GID] or 'image', got '$user'"
    ((${user%%:*} != 0)) || die "--user 0 is root; the image runs as a non-root user"
    user_args=(--user "$user")
fi
for kv in "${envs[@]+"${envs[@]}"}"; do
    [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env takes KEY=VALUE, got '$kv'"
done

# --- mounts -------------------------------------------------------------------------------------
mounts=()
if [[ -n $data ]]; then
    [[ -d $data ]] || die "--data: no such directory: $data"
    data=$(cd "$data" && pwd -P)
    mounts+=(--mount "$(mount_arg "$data" /data readonly)")
fi
if [[ -n $output ]]; then
    [[ ! -e $output || -d $output ]] || die "--output: not a directory: $output"
    output=$(abs_path "$output")
    if [[ $user == image && -d $output && $(stat -c %u "$output") != "$IMAGE_UID" ]]; then
        printf '%s: warning: the container runs as uid %s; make --output %s writable for it\n' \
            "$PROG" "$IMAGE_UID" "$output" >&2
    fi
    mounts+=(--mount "$(mount_arg "$output" /output)")
fi

# --- the program in the container ---------------------------------------------------------------
torchrun=(torchrun --nnodes "$nnodes" --nproc-per-node "$nproc" "${rendezvous[@]}")
case $command in
    train)
        program=("${torchrun[@]}" -m train)
        if [[ -n $config ]] && ! has_arg --config; then
            if [[ -f $config ]]; then
                config_dir=$(cd "$(dirname "$config")" && pwd -P)
                mounts+=(--mount "$(mount_arg "$config_dir" /config readonly)")
                program+=(--config "/config/$(basename "$config")")
            else
                program+=(--config "$config")
            fi
        fi
        if [[ -n $data ]]; then   # without --data: the config's data, or the demo
            for split in train val; do
                has_arg "--data.$split" && continue
                sub=$train_dir; [[ $split == val ]] && sub=$val_dir
                [[ -e $data/$sub ]] || die \
                    "--data: no '$sub' in $data (set --$split-dir, or pass --data.$split after --)"
                program+=("--data.$split" "/data/$sub")
            done
        fi
        if ! has_arg --output && ! has_arg --run.output; then
            [[ -n $output ]] || die "train needs --output DIR for checkpoints and logs"
            program+=(--output /output)
        fi ;;
    bench-pipeline) program=(python -m tools.bench_pipeline) ;;
    bench-train) program=("${torchrun[@]}" -m tools.bench_train) ;;
    scan)
        [[ -n $data ]] || die "scan needs --data DIR (the folder to scan)"
        program=(python -m pipelines.scan /data) ;;
    smoke)
        program=(python -m mixpro_dali.smoke)
        [[ $gpus == none ]] || program+=(--require-gpu) ;;
    shell) program=(bash) ;;
esac
program+=("${extra[@]+"${extra[@]}"}")

# --- docker run -----------------------------------------------------------------------------
cmd=(docker run --rm --init "${docker_gpus[@]}" --shm-size "$shm_size")
((memlock == 0)) || cmd+=(--ulimit memlock=-1)
cmd+=(--ulimit stack=67108864 "${user_args[@]+"${user_args[@]}"}")
# Several nodes: NCCL and the rendezvous reach the other nodes over the host's interfaces.
if ((nnodes > 1)); then cmd+=(--network host); fi
if [[ $command == shell ]]; then
    cmd+=(-i); [[ -t 0 && -t 1 ]] && cmd+=(-t)
elif [[ -t 0 && -t 1 ]]; then
    cmd+=(-t)   # a terminal: Ctrl-C reaches torchrun, output is line-buffered
fi
while IFS= read -r name; do
    [[ $name == NCCL_* ]] && cmd+=(-e "$name")
done < <(compgen -e)
for kv in "${envs[@]+"${envs[@]}"}"; do cmd+=(-e "$kv"); done
cmd+=("${mounts[@]+"${mounts[@]}"}" "${docker_args[@]+"${docker_args[@]}"}" "$image" "${program[@]}")

if ((dry_run)); then
    printf '%q' "${cmd[0]}"
    printf ' %q' "${cmd[@]:1}"
    printf '\n'
    exit 0
fi
if [[ -n $output && ! -d $output ]]; then
    mkdir -p "$output"
    # A root caller runs the container as the image's user: hand it the folder we just made.
    if [[ $user == image && $(id -u) == 0 ]]; then chown "$IMAGE_UID:$IMAGE_UID" "$output"; fi
fi
# runc reports a refused memlock limit only as "error setting rlimit type 8: operation not
# permitted": docker's stderr passes through a filter that adds what to do. exec keeps docker
# the process that gets the signals (Ctrl-C, Slurm's SIGTERM).
explain_rlimit() {
    local line
    while IFS= read -r line || [[ -n $line ]]; do
        printf '%s\n' "$line" >&2
        if [[ $line == *"error setting rlimit"* ]]; then
            printf '%s: error: the Docker daemon may not raise the locked-memory limit for ' "$PROG" >&2
            printf '%s\n' "--ulimit memlock=-1 (rootless Docker, a locked-down host); run again with --no-memlock" >&2
        fi
    done
}
if ((memlock)); then exec "${cmd[@]}" 2> >(explain_rlimit); fi
exec "${cmd[@]}"
