namespace OrleansIdempotency.Grains;

/// <summary>
/// The persisted state of one <c>(scope, key)</c>. Immutable: every transition builds a new record, which is
/// written (ETag-checked) before anybody is told about it.
/// </summary>
[GenerateSerializer, Alias("OrleansIdempotency.IdempotencyRecord")]
public sealed record IdempotencyRecord
{
    /// <summary>The state of the key.</summary>
    [Id(0)] public IdempotencyStatus Status { get; init; }

    /// <summary>SHA-256 of the request that claimed the key; a different request under the same key is refused.</summary>
    [Id(1)] public byte[] Fingerprint { get; init; } = [];

    /// <summary>The attempt that holds (or last held) the claim. Asking again with it returns the same claim.</summary>
    [Id(2)] public Guid AttemptId { get; init; }

    /// <summary>
    /// Raised by every new claim and never lowered while the record exists, so a completion that carries an
    /// older token can be told apart from the current holder's.
    /// </summary>
    [Id(3)] public long FencingToken { get; init; }

    /// <summary>When the current claim lapses unless completed or renewed.</summary>
    [Id(4)] public DateTimeOffset LeaseExpiresAt { get; init; }

    /// <summary>When the key was first claimed.</summary>
    [Id(5)] public DateTimeOffset CreatedAt { get; init; }

    /// <summary>When the record is past its retention: it then behaves as absent and is purged from storage.</summary>
    [Id(6)] public DateTimeOffset ExpiresAt { get; init; }

    /// <summary>The stored outcome, once <see cref="Status"/> is <see cref="IdempotencyStatus.Completed"/>.</summary>
    [Id(7)] public StoredResponse? Response { get; init; }

    /// <summary>How long the key is remembered after it is claimed or completed, as the claim asked.</summary>
    [Id(8)] public TimeSpan Retention { get; init; }

    /// <summary>
    /// The record as it behaves at <paramref name="now"/>: past its retention it is absent, unless a live lease
    /// still holds it (an action may outlast the retention; its claim must not vanish under it).
    /// </summary>
    /// <remarks>The fencing token survives expiry so that tokens never repeat while the row exists.</remarks>
    public IdempotencyRecord AsOf(DateTimeOffset now) =>
        HoldsRequest && ExpiresAt <= now && !(Status == IdempotencyStatus.InProgress && now < LeaseExpiresAt)
            ? new IdempotencyRecord { FencingToken = FencingToken }
            : this;

    /// <summary>
    /// When storage may drop the record: its expiry, or the end of a live lease that outlasts it (as in
    /// <see cref="AsOf"/>, a claim must not vanish under its action).
    /// </summary>
    public DateTimeOffset PurgeableAt =>
        Status == IdempotencyStatus.InProgress && LeaseExpiresAt > ExpiresAt ? LeaseExpiresAt : ExpiresAt;

    /// <summary>
    /// True when the record is of a request: claimed, completed or in doubt, or released but kept for its retention
    /// (only that request may claim it again). A new or expired key's record holds none.
    /// </summary>
    public bool HoldsRequest => Status != IdempotencyStatus.None || Fingerprint.Length > 0;

    /// <summary>True when <paramref name="fingerprint"/> is the request that claimed the key.</summary>
    public bool Matches(ReadOnlySpan<byte> fingerprint) => Fingerprint.AsSpan().SequenceEqual(fingerprint);

    /// <summary>True when <paramref name="token"/> is the claim this record was given.</summary>
    public bool IsHeldBy(ClaimToken token) => AttemptId == token.AttemptId && FencingToken == token.FencingToken;

    /// <summary>The claim this record holds.</summary>
    public ClaimToken Token => new(AttemptId, FencingToken);
}
