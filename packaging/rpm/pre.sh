# %pre of appliance (RPM): the IPC groups exist before the files are laid down.
for group in appliance appliance-ro; do
    getent group "$group" >/dev/null || groupadd -r "$group"
done
exit 0
