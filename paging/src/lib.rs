//! remoca paging (being built).
