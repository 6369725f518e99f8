"""Load scenarios: one file each; ``Scenario.registry()`` finds them."""
