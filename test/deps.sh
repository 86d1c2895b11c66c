#!/usr/bin/env bash
# Installs, from Debian's packages, whatever the build, the demo and the tests
# need and is missing. Sourced by test/run and test/demo.
notify_ext_install_deps() {
    # postfix and dovecot: the real mail path of the relay and bounce tests
    # (test/lib/mailstack.py starts instances of its own; the system-wide
    # services are left unconfigured)
    local pkgs=(make gcc git postgresql-15 postgresql-server-dev-15 postgresql-common
                libcurl4-openssl-dev python3-pytest python3-psycopg python3-aiosmtpd
                postfix dovecot-imapd dovecot-lmtpd "$@")
    local missing=()
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "== installing: ${missing[*]}"
        if [ "$(id -u)" -ne 0 ]; then
            echo "missing packages and not root: sudo apt-get install -y ${missing[*]}" >&2
            return 1
        fi
        # postfix: no system-wide configuration, so no system-wide Postfix starts
        echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
}

# Builds and installs the extension into the PostgreSQL that pg_config names.
notify_ext_build_install() {
    make -s clean
    make -s
    if [ "$(id -u)" -eq 0 ]; then make -s install; else sudo make -s install; fi
}
