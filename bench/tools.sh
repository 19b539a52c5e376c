# Sourced by the benchmark scripts: the tools they need, found on PATH or
# in /usr/sbin (where the daemons are, often off a user's PATH).

# require_tools SCRIPT HINT TOOL...: exits, naming the first one missing.
require_tools() {
    local script=$1 hint=$2 tool
    shift 2
    for tool in "$@"; do
        if ! command -v "$tool" >/dev/null && ! [[ -x /usr/sbin/$tool ]]; then
            echo "$script: $tool is missing ($hint)" >&2
            exit 1
        fi
    done
}

# tool_path TOOL: where it is.
tool_path() {
    command -v "$1" || echo "/usr/sbin/$1"
}
