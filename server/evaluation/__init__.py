"""LaMP evaluation (`mta eval`): MTA against its baselines on the same held-out users, one run."""
