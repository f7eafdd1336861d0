//! The scheduler: a pure planner ([`plan`]) and the reconciler that feeds and executes it.

pub mod plan;
