#!/bin/sh
# Installs the Debian tools the end-to-end tests drive (swaks with its TLS/SASL modules, fetchmail,
# mbsync, dovecot, and the IMAP clients of tests/test_imap_clients.py: offlineimap3, curl,
# getmail6, mutt).
# Runs apt-get only when something is missing and we are root; otherwise says what is missing.
set -e
need=""
command -v swaks >/dev/null 2>&1 || need="$need swaks"
# swaks only Recommends these; without them it cannot do STARTTLS/SMTPS (Net::SSLeay) or AUTH.
perl -MNet::SSLeay -e1 >/dev/null 2>&1 || need="$need libnet-ssleay-perl"
perl -MIO::Socket::SSL -e1 >/dev/null 2>&1 || need="$need libio-socket-ssl-perl"
perl -MAuthen::SASL -e1 >/dev/null 2>&1 || need="$need libauthen-sasl-perl"
command -v fetchmail >/dev/null 2>&1 || need="$need fetchmail"
command -v mbsync >/dev/null 2>&1 || need="$need isync"
[ -x /usr/sbin/dovecot ] || need="$need dovecot-imapd dovecot-pop3d"
command -v offlineimap >/dev/null 2>&1 || need="$need offlineimap3"
command -v curl >/dev/null 2>&1 || need="$need curl"
command -v getmail >/dev/null 2>&1 || need="$need getmail6"
command -v mutt >/dev/null 2>&1 || need="$need mutt"
[ -z "$need" ] && exit 0
if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $need >/dev/null
else
    echo "missing test tools:$need (install them with apt-get as root)" >&2
    if [ "${CI:-}" = "true" ]; then exit 1; fi
fi
