# %preun of appliance (RPM). $1 = packages left after this one: 0 = erase (stop the daemon,
# fully), 1 = upgrade (nothing: the new package's %posttrans restarts it headless).
# The byte-code %posttrans compiled goes on erase only (on upgrade this runs after the new
# package's files and scripts).
if [ "$1" -eq 0 ]; then
    if [ -d /run/systemd/system ]; then
        rm -f /run/appliance/stop-headless
        systemctl stop applianced.service >/dev/null 2>&1 || :
        systemctl disable applianced.service >/dev/null 2>&1 || :
    fi
    find /usr/lib/appliance/venv -name __pycache__ -type d -prune -exec rm -rf {} + 2>/dev/null || :
fi
exit 0
