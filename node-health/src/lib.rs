//! twosite's decision core: pure functions and small state machines over observed state and an
//! injected clock. No IO and no async: the controller, the node agent, the witness and the
//! simulation all call this same code.

pub mod leader;
pub mod rooms;
pub mod time;
pub mod verdict;

pub use leader::{LeaderAction, LeaderConfig, LeaderElector, LeaseRecord, LeaseWrite};
pub use rooms::{NodeFacts, Pair, Pairing, Room, RoomConfig, RoomError, pair_nodes};
pub use time::{Clock, MonoTime, SystemClock};
pub use verdict::{HealthTiming, Heartbeat, NodeObservation, NodeVerdict, Readiness, judge};
