"""Load generators: open-loop arrivals for the policy suite, a saturated agent, a simulated fleet."""
