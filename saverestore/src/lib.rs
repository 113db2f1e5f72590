//! remoca saverestore (being built).
