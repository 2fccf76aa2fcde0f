"""Features: the schema every service shares (names, kinds, Feast views), the candidate-index rules (weights and
the one `observe_interaction`), the pure aggregations that fold events into visitor and item state, and the
Feast store that holds the rows. Imports only `services.common`; the services import it."""
