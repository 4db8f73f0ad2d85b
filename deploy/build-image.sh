#!/usr/bin/env bash
# `make image`: deploy/Dockerfile -> the local image $IMAGE, on $BASE_IMAGE, with BuildKit.
#
# Pip inside the build gets this machine's pip configuration and CA bundle as BuildKit secrets
# (never in a layer): what `pip config list` shows, less what cannot work inside the image
# (local files and folders: constraint and requirement files, file:// indexes, local
# find-links), with `cert` pointing at the secret `pip_cert`. That is what a build behind a
# TLS-intercepting proxy needs. PIP_CERT_BUNDLE=FILE passes another CA bundle (the whole bundle
# pip should trust, as pip's own `cert`); NO_PIP_SECRETS=1 passes nothing.
#
# The docker CLI: $DOCKER, else `docker`; with buildx `docker buildx build --load`, without it
# the engine's built-in BuildKit (a CLI older than 23: DOCKER_BUILDKIT=1 docker build). When
# `docker` on PATH is a newer CLI without buildx, the engine package's own /usr/bin/docker is used.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-imagepipe:dev}
BASE_IMAGE=${BASE_IMAGE:-nvidia/cuda:13.0.1-runtime-ubuntu24.04}
PYTHON=${PYTHON:-python3}

builder() {  # prints the build command's words, one a line
    local cli
    for cli in ${DOCKER:-} docker /usr/bin/docker; do
        command -v "$cli" >/dev/null 2>&1 || continue
        if "$cli" buildx version >/dev/null 2>&1; then
            printf '%s\n' "$cli" buildx build --load
            return
        fi
        local major
        major=$("$cli" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1) || true
        if [[ $major =~ ^[0-9]+$ ]] && ((major < 23)); then
            printf '%s\n' env DOCKER_BUILDKIT=1 "$cli" build
            return
        fi
    done
    echo "make image: no docker CLI that builds with BuildKit (install docker-buildx, or Docker's" \
         "engine package, whose CLI has BuildKit built in)" >&2
    return 2
}

secrets=$(mktemp -d)
trap 'rm -rf "$secrets"' EXIT
secret_args=()
if [[ -z ${NO_PIP_SECRETS:-} ]]; then
    # `pip config list` prints `section.key='value'`, PIP_* env variables as `:env:.key=...`
    # (first); an env variable beats the files' value of the same key, as in pip.
    declare -A conf=()
    while IFS= read -r line; do
        key=${line%%=*}
        value=${line#*=}
        value=${value#\'}
        value=${value%\'}
        name=${key#*.}
        section=${key%%.*}
        [[ $section == :env: ]] && section=global
        [[ -n ${conf[$section.$name]+set} && $key != :env:* ]] && continue  # env already won
        case $name in
            cert)
                PIP_CERT_BUNDLE=${PIP_CERT_BUNDLE:-$value}
                continue ;;
            constraint | constraints | requirement | requirements | client-cert | no-index)
                continue ;;
            index-url | extra-index-url | find-links)
                kept=()
                for url in $value; do
                    [[ $url == http://* || $url == https://* ]] && kept+=("$url")
                done
                ((${#kept[@]})) || continue
                value="${kept[*]}" ;;
        esac
        conf[$section.$name]=$value
    done < <("$PYTHON" -m pip config list 2>/dev/null || true)
    if [[ -n ${PIP_CERT_BUNDLE:-} ]]; then
        cp "$PIP_CERT_BUNDLE" "$secrets/pip_cert"
        conf[global.cert]=/run/secrets/pip_cert
        secret_args+=(--secret "id=pip_cert,src=$secrets/pip_cert")
    fi
    for section in $(printf '%s\n' "${!conf[@]}" | cut -d. -f1 | sort -u); do
        echo "[$section]"
        for key in "${!conf[@]}"; do
            [[ ${key%%.*} == "$section" ]] && echo "${key#*.} = ${conf[$key]}"
        done
    done > "$secrets/pip_conf"
    secret_args+=(--secret "id=pip_conf,src=$secrets/pip_conf")
    echo "pip configuration passed to the build (secret pip_conf):"
    sed 's/^/  /' "$secrets/pip_conf"
fi

mapfile -t build < <(builder)
((${#build[@]})) || exit 2
set -x
"${build[@]}" -f deploy/Dockerfile --build-arg "BASE_IMAGE=$BASE_IMAGE" "${secret_args[@]}" \
    -t "$IMAGE" .
