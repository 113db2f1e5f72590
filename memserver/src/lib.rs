//! remoca memserver (being built).
