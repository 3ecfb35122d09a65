using System.Collections.Concurrent;
using System.Globalization;
using Orleans.Storage;
using OrleansIdempotency.Grains;

namespace OrleansIdempotency.Silo.Storage;

/// <summary>
/// The embedded default's records: in this silo's memory, with the ETag contract of PostgreSQL's (a write without an
/// ETag creates and never overwrites, a write with one changes only that version) and its purge: a record is
/// dropped at <see cref="IdempotencyRecord.PurgeableAt"/>, so memory holds only records within their retention.
/// Unlike PostgreSQL it has no late-write check: a write here lands within the grain's turn or not at all.
/// </summary>
/// <remarks>
/// Each record is kept as its serialized bytes, so no grain ever shares an object with the store. ETags come from
/// one counter and are never reused: an activation still holding the ETag of a purged record cannot match the
/// record created after it. Per process: several silos would each hold their own records, so the hosting refuses a
/// cluster (Redis) without PostgreSQL; <see cref="Hosting.IdempotencySiloBuilderExtensions.AddIdempotencyMemoryStorage"/>
/// is for a single silo only.
/// </remarks>
public sealed class InMemoryRecordStorage : IGrainStorage, IDisposable
{
    /// <summary>How often expired records are dropped.</summary>
    public static readonly TimeSpan PurgeInterval = TimeSpan.FromMinutes(1);

    private readonly ConcurrentDictionary<(string StateName, GrainId GrainId), Entry> records = new();
    private readonly IGrainStorageSerializer serializer;
    private readonly TimeProvider time;
    private readonly ITimer purge;
    private long lastETag;

    public InMemoryRecordStorage(IGrainStorageSerializer serializer, TimeProvider time)
    {
        this.serializer = serializer;
        this.time = time;
        purge = time.CreateTimer(_ => Purge(), null, PurgeInterval, PurgeInterval);
    }

    /// <summary>How many records are held, expired or not.</summary>
    public int Count => records.Count;

    public Task ReadStateAsync<T>(string stateName, GrainId grainId, IGrainState<T> grainState)
    {
        if (records.TryGetValue((stateName, grainId), out var entry))
        {
            grainState.State = serializer.Deserialize<T>(new BinaryData(entry.Payload));
            grainState.ETag = entry.ETag.ToString(CultureInfo.InvariantCulture);
            grainState.RecordExists = true;
        }
        else
        {
            grainState.State = Activator.CreateInstance<T>();
            grainState.ETag = null;
            grainState.RecordExists = false;
        }

        return Task.CompletedTask;
    }

    public Task WriteStateAsync<T>(string stateName, GrainId grainId, IGrainState<T> grainState)
    {
        var key = (stateName, grainId);
        // An exact-size copy: the serializer's buffer may be twice the record, and the record stays for its retention.
        var next = new Entry(
            serializer.Serialize(grainState.State).ToArray(),
            Interlocked.Increment(ref lastETag),
            (grainState.State is IdempotencyRecord record ? record.PurgeableAt : DateTimeOffset.MaxValue).UtcTicks);
        var written = grainState.ETag is null
            ? records.TryAdd(key, next)
            : records.TryGetValue(key, out var current) && current.Matches(grainState.ETag) && records.TryUpdate(key, next, current);
        if (!written)
        {
            throw Conflict("write", grainId, grainState.ETag);
        }

        grainState.ETag = next.ETag.ToString(CultureInfo.InvariantCulture);
        grainState.RecordExists = true;
        return Task.CompletedTask;
    }

    public Task ClearStateAsync<T>(string stateName, GrainId grainId, IGrainState<T> grainState)
    {
        var key = (stateName, grainId);
        if (grainState.ETag is not null)
        {
            if (!records.TryGetValue(key, out var current) || !current.Matches(grainState.ETag) || !records.TryRemove(KeyValuePair.Create(key, current)))
            {
                throw Conflict("clear", grainId, grainState.ETag);
            }
        }
        else if (records.ContainsKey(key))
        {
            throw Conflict("clear", grainId, grainState.ETag);
        }

        grainState.State = Activator.CreateInstance<T>();
        grainState.ETag = null;
        grainState.RecordExists = false;
        return Task.CompletedTask;
    }

    public void Dispose() => purge.Dispose();

    /// <summary>Drops every record past <see cref="IdempotencyRecord.PurgeableAt"/>; a record rewritten meanwhile is kept.</summary>
    public void Purge()
    {
        var now = time.GetUtcNow().UtcTicks;
        foreach (var pair in records)
        {
            if (pair.Value.ExpiresAtUtcTicks <= now)
            {
                records.TryRemove(pair);
            }
        }
    }

    private static InconsistentStateException Conflict(string operation, GrainId grainId, string? etag) =>
        new($"The {operation} of {grainId} expected version {etag ?? "(none)"}, which is not the stored one.");

    // A struct of one array and two numbers: millions of records are held, and every object among them is work for
    // each full garbage collection (a class, BinaryData and a string ETag per record tripled that). A conditional
    // update or removal compares the entry that was read by value; its ETag is never reused, so equal means the same.
    private readonly record struct Entry(byte[] Payload, long ETag, long ExpiresAtUtcTicks)
    {
        // Compared as the text this store issued, so that no other spelling of the number ("01") matches.
        public bool Matches(string? etag)
        {
            Span<char> issued = stackalloc char[20];
            return etag is not null && ETag.TryFormat(issued, out var length, provider: CultureInfo.InvariantCulture)
                && issued[..length].SequenceEqual(etag);
        }
    }
}
