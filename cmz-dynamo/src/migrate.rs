//! Migration (TODO).
