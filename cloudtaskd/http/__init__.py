"""The control API's HTTP surface: routes, submissions, bundles, runs and what it shows."""
