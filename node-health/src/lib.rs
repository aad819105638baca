//! twosite's decision core: pure functions and small state machines over observed state and an
//! injected clock. No IO and no async: the controller, the node agent, the witness and the
//! simulation all call this same code.

pub mod agent;
#[cfg(feature = "agent")]
pub mod agentd;
pub mod assess;
pub mod contact;
pub mod leader;
pub mod peer_auth;
pub mod remediation;
pub mod report;
pub mod rooms;
pub mod time;
pub mod verdict;
pub mod vm;
pub mod volume;
pub mod witness;

pub use agent::{
    AgentCore, AgentStep, Handover, LossReason, PeerReport, ResumeState, Resumed, RunBasis,
};
pub use assess::{Assessment, ClusterView, NodeAssessment, NodeView, assess};
pub use contact::OtherRoomMarks;
pub use leader::{LeaderAction, LeaderConfig, LeaderElector, LeaseRecord, LeaseWrite};
pub use remediation::{Action, EventReason, NodeRemediation, Phase, RemediationInput};
pub use report::report;
pub use rooms::{NodeFacts, Pair, Pairing, Room, RoomConfig, RoomError, pair_nodes};
pub use time::{Clock, MonoTime, SystemClock};
pub use verdict::{HealthTiming, Heartbeat, NodeObservation, NodeVerdict, Readiness, judge};
pub use volume::{
    GuardAction, GuardState, LeaseView, TakeRefusal, VolumeGuard, VolumeLease, VolumeTiming,
    may_take,
};
pub use witness::{Arbiter, Claim, ClaimError, ClaimOutcome, WitnessConfig, WitnessRecord};
