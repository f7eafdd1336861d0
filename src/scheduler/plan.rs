//! The pure planner: `plan(desired, observed) -> Vec<Action>`. No I/O.
