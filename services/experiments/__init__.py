"""A/B experiments: configuration, assignment, exposures, outcome attribution, statistics, reports and
their routes. Used by the recommend, messages and profile services; imports none of them (an import contract)."""
