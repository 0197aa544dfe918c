# %postun of appliance (RPM). On erase ($1 = 0) remove the kernel state a headless stop may
# have left (pinned maps) and the runtime directory. The groups stay, as Fedora's packaging
# guidelines ask (files elsewhere may still carry their ids).
if [ "$1" -eq 0 ]; then
    for pin in /sys/fs/bpf/appliance*; do
        [ -e "$pin" ] && rm -rf "$pin"
    done
    rm -rf /run/appliance
fi
if [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null 2>&1 || :
fi
exit 0
