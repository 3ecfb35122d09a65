using System.Collections.Concurrent;
using Microsoft.Extensions.Logging;

namespace OrleansIdempotency.AspNetCore.Tests;

/// <summary>A log that cannot be written for the messages holding a text (its disk full, say); the others it writes.</summary>
internal sealed class FailingLog(string failsFor) : ILogger
{
    private int failures;

    public ConcurrentQueue<string> Written { get; } = new();

    /// <summary>How many messages could not be written.</summary>
    public int Failures => Volatile.Read(ref failures);

    public IDisposable? BeginScope<TState>(TState state)
        where TState : notnull => null;

    public bool IsEnabled(LogLevel logLevel) => true;

    public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
    {
        if (formatter(state, exception).Contains(failsFor, StringComparison.Ordinal))
        {
            Interlocked.Increment(ref failures);
            throw new IOException("The log cannot be written.");
        }

        Written.Enqueue(formatter(state, exception));
    }
}

/// <inheritdoc cref="FailingLog"/>
internal sealed class FailingLog<T>(string failsFor) : ILogger<T>
{
    private readonly FailingLog log = new(failsFor);

    public int Failures => log.Failures;

    public IDisposable? BeginScope<TState>(TState state)
        where TState : notnull => log.BeginScope(state);

    public bool IsEnabled(LogLevel logLevel) => log.IsEnabled(logLevel);

    public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter) =>
        log.Log(logLevel, eventId, state, exception, formatter);
}
