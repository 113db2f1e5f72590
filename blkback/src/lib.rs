//! remoca blkback (being built).
