"""What every stage stands on: errors, atomic files, progress lines, device and dtype,
the config, the run directorys layout, the runs plan and the one up-to-date check."""
