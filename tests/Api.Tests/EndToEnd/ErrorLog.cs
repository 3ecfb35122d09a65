using System.Collections.Concurrent;
using Microsoft.Extensions.Logging;

namespace OrleansIdempotency.Api.Tests.EndToEnd;

/// <summary>The exceptions the API logged at Error or above, whatever the category.</summary>
public sealed class ErrorLog : ILoggerProvider
{
    private readonly ConcurrentQueue<Exception> exceptions = new();

    public IReadOnlyCollection<Exception> Exceptions => exceptions;

    public ILogger CreateLogger(string categoryName) => new Logger(exceptions);

    public void Dispose()
    {
    }

    private sealed class Logger(ConcurrentQueue<Exception> exceptions) : ILogger
    {
        public IDisposable? BeginScope<TState>(TState state)
            where TState : notnull => null;

        public bool IsEnabled(LogLevel logLevel) => logLevel >= LogLevel.Error;

        public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
        {
            if (IsEnabled(logLevel) && exception is not null)
            {
                exceptions.Enqueue(exception);
            }
        }
    }
}
