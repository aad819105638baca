//! Publishing Events without keeping them.
//!
//! kube's `Recorder` keeps every Event it published for six minutes, to turn repeats into a
//! series. twosite's Events are one per transition (a node fenced, a VM failed over), never
//! repeated, and a lost room publishes thousands at once: kept, they were about 18 MiB of a
//! 1,000-node controller's memory for six minutes. Each Event here goes through a fresh
//! `Recorder`, dropped once it is sent.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, Recorder, Reporter};

/// Where the controller's Events go.
#[derive(Clone)]
pub struct EventSink {
    client: kube::Client,
    reporter: Reporter,
}

impl EventSink {
    pub fn new(client: kube::Client, reporter: Reporter) -> EventSink {
        EventSink { client, reporter }
    }

    /// Publishes `event` about `regarding`.
    pub async fn publish(
        &self,
        event: &Event,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        Recorder::new(self.client.clone(), self.reporter.clone())
            .publish(event, regarding)
            .await
    }
}
