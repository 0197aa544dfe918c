# %posttrans of appliance (RPM): runs last in the transaction, from the new package, once the
# old package's files are gone: compile the virtualenv's byte-code in place. A running
# applianced is an upgrade (a fresh install does not start it): restart it headless, so the
# kernel flow cache keeps forwarding and the new daemon adopts it.
/usr/lib/appliance/venv/bin/python -m compileall -q -j 0 /usr/lib/appliance/venv/lib >/dev/null \
    || echo "appliance: some modules did not compile (they still run)" >&2
if [ -d /run/systemd/system ] && systemctl --quiet is-active applianced.service; then
    dir=$(/usr/lib/appliance/venv/bin/python -c '
from appliance.daemon.settings import DEFAULT_SETTINGS, load_settings
print(load_settings(DEFAULT_SETTINGS if DEFAULT_SETTINGS.exists() else None).state_dir)
' 2>/dev/null || echo /run/appliance)
    mkdir -p "$dir"
    touch "$dir/stop-headless"
    systemctl restart applianced.service || echo "appliance: restart failed" >&2
    rm -f "$dir/stop-headless"
fi
exit 0
